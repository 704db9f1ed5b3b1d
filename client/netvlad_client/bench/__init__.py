"""netvlad-bench, the load test of netvlad-server, and the harness tests and scripts share.

A load generator is a client of the service, so it ships with the client package:

- `harness`: free port, start `python -m netvlad_server`, wait for SERVING, /metrics, /proc RSS;
- `load`: the concurrent callers and the server-side numbers read around them;
- `inprocess`: what runs server code in this process (decoding, the raw network), imported lazily;
- `results`: the summary ratios, the printed report and the plot;
- `cli`: the `netvlad-bench` command.

Importing this package loads neither TensorFlow nor netvlad_server.
"""
