"""Names both sides use in Flower messages (the ServerApp writes them, the ClientApp reads them).

Coordinator -> site: RecordDict {"arrays": global adapter (ArrayRecord), "config": ConfigRecord
{CONFIG_KEY: FedTuneConfig JSON, "server-round": int}}.
Site -> coordinator: {"arrays": delta (train only), "metrics": MetricRecord (num-examples, losses,
timings, counts), "site": ConfigRecord {"name", "status"}}. Status "ok", or why no update
("data-error", "no-usable-examples", "no-eval-examples").
"""

CONFIG_KEY = "fedtune-config"
ROUND_KEY = "server-round"
