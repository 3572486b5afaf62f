"""wirehub's benchmarks: the load generator (:mod:`bench.loadgen`), the naive Tornado baseline and the runner."""
