"""The search layer: space files parsed without any engine (`space`), Optuna's side of a
search (`optuna_bridge`), the results of a search folder kept exactly once (`recorder`, over
`results` and `croft_search.tracking`), and the Ray Tune engine that runs trials
(`ray_engine`)."""
