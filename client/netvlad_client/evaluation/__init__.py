"""Place-recognition evaluation (docs/EVALUATION.md): precision-recall curve, AUC and recall@N.

NumPy only, so it runs wherever the thin client runs; matplotlib is imported lazily inside the
plotting functions. The package by concern:

* `settings`: EvaluationSettings, EvaluationError and the shared input checks;
* `descriptors`: descriptor rows as the test takes them (``dims``, files, missing rows);
* `neighbours`: nearest non-suppressed frames by descriptor and position, in bounded memory;
* `prcurve`: the test itself (its definitions are that module's docstring), AUC, recall@N;
* `frames`: natural frame order and the timestamps in frame names;
* `groundtruth`: KITTI poses, plain positions, TUM and EuRoC trajectories;
* `plots`: PR curves, confusion matrices and the trajectory with its loop closures.

Every public name is importable from the package itself, as before the split.
"""

from netvlad_client.evaluation.descriptors import (
    check_descriptors,
    missing_rows,
    read_descriptors,
    select_dims,
)
from netvlad_client.evaluation.frames import (
    NANOSECOND_DIGITS,
    NS_PER_S,
    frame_name,
    name_pattern,
    name_time_ns,
    natural_key,
    natural_order,
    seconds_to_ns,
    shown_names,
    time_order,
)
from netvlad_client.evaluation.groundtruth import (
    GroundTruth,
    match_times,
    read_euroc_groundtruth,
    read_kitti_poses,
    read_positions,
    read_tum_trajectory,
)
from netvlad_client.evaluation.neighbours import (
    BLOCK_ELEMENTS,
    nearest_matches,
    nearest_position_distances,
    pair_sqdist,
)
from netvlad_client.evaluation.plots import (
    PLOT_PLANES,
    confusion_figure,
    plot_pr_curves,
    require_matplotlib,
    save_figure,
    trajectory_figure,
)
from netvlad_client.evaluation.prcurve import (
    ConfusionMatrices,
    Evaluation,
    accepted_at_precision,
    auc_from_zero,
    confusion_matrices,
    evaluate,
    precision_recall,
    reference_auc,
)
from netvlad_client.evaluation.settings import (
    DEFAULT_DIMS,
    DEFAULT_RADIUS,
    DEFAULT_RECALL_LEVELS,
    DEFAULT_RECALL_NS,
    DEFAULT_SUPPRESSION,
    EvaluationError,
    EvaluationSettings,
    check_counts,
    check_positions,
    half_width,
)

__all__ = [
    "BLOCK_ELEMENTS",
    "DEFAULT_DIMS",
    "DEFAULT_RADIUS",
    "DEFAULT_RECALL_LEVELS",
    "DEFAULT_RECALL_NS",
    "DEFAULT_SUPPRESSION",
    "NANOSECOND_DIGITS",
    "NS_PER_S",
    "PLOT_PLANES",
    "ConfusionMatrices",
    "Evaluation",
    "EvaluationError",
    "EvaluationSettings",
    "GroundTruth",
    "accepted_at_precision",
    "auc_from_zero",
    "check_counts",
    "check_descriptors",
    "check_positions",
    "confusion_figure",
    "confusion_matrices",
    "evaluate",
    "frame_name",
    "half_width",
    "match_times",
    "missing_rows",
    "name_pattern",
    "name_time_ns",
    "natural_key",
    "natural_order",
    "nearest_matches",
    "nearest_position_distances",
    "pair_sqdist",
    "plot_pr_curves",
    "precision_recall",
    "read_descriptors",
    "read_euroc_groundtruth",
    "read_kitti_poses",
    "read_positions",
    "read_tum_trajectory",
    "reference_auc",
    "require_matplotlib",
    "save_figure",
    "seconds_to_ns",
    "select_dims",
    "shown_names",
    "time_order",
    "trajectory_figure",
]
