"""Retrieval recall@N on the place-recognition benchmarks (Pittsburgh, Tokyo 24/7).

A benchmark is a database of images and a set of queries, each with a position (UTM easting,
northing). Every query's descriptor is searched among the database descriptors (faiss, exact
inner product of unit vectors, i.e. cosine); the query is correct at N when any of its N nearest
database images lies within the positive radius of the query's position (25 m on Pittsburgh and
Tokyo 24/7). recall@N is the share of ALL queries correct at N, as the NetVLAD paper counts it;
queries with no database image within the radius can never be correct and are counted apart.

Inputs are Relja Arandjelović's MATLAB ``dbStruct`` files (``pitts30k_test.mat``,
``tokyo247.mat``, ...) or two plain CSV files ``path,easting,northing``. faiss, scipy (for .mat
files) and matplotlib (figures) come with the ``eval`` extra and are imported only when needed,
so the thin client imports without them. docs/EVALUATION.md says how to run it.

The package by concern: `benchmark` (image sets, the CSV reader), `dbstruct` (the MATLAB
reader), `recall` (search, recall@N, per-query files), `figures`, and `errors` (RetrievalError,
the optional imports). Every public name is importable from the package itself.
"""

from netvlad_client.retrieval.benchmark import (
    DEFAULT_RADIUS,
    Benchmark,
    ImageSet,
    check_missing_images,
    read_csv_benchmark,
    read_position_csv,
)
from netvlad_client.retrieval.dbstruct import REQUIRED_FIELDS, read_dbstruct
from netvlad_client.retrieval.errors import EXTRA_HINT, RetrievalError, require
from netvlad_client.retrieval.figures import (
    DEFAULT_EXAMPLES,
    EXAMPLE_TOP,
    choose_examples,
    plot_examples,
    plot_recall_curve,
)
from netvlad_client.retrieval.recall import (
    DEFAULT_RECALL_NS,
    RetrievalResult,
    evaluate_retrieval,
    nearest_positive_distances,
    prepare_descriptors,
    search,
    write_per_query_csv,
    write_per_query_json,
)

__all__ = [
    "DEFAULT_EXAMPLES",
    "DEFAULT_RADIUS",
    "DEFAULT_RECALL_NS",
    "EXAMPLE_TOP",
    "EXTRA_HINT",
    "REQUIRED_FIELDS",
    "Benchmark",
    "ImageSet",
    "RetrievalError",
    "RetrievalResult",
    "check_missing_images",
    "choose_examples",
    "evaluate_retrieval",
    "nearest_positive_distances",
    "plot_examples",
    "plot_recall_curve",
    "prepare_descriptors",
    "read_csv_benchmark",
    "read_dbstruct",
    "read_position_csv",
    "require",
    "search",
    "write_per_query_csv",
    "write_per_query_json",
]
