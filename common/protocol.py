"""Names both sides use in Flower messages (the ServerApp writes them, the ClientApp reads them).

Coordinator -> site: RecordDict {"arrays" + "adapter-layout": the global adapter (one float32
vector plus names and shapes, see fedtune.common.adapters.adapter_records), "config":
ConfigRecord {CONFIG_KEY: FedTuneConfig JSON, "server-round": int, and for TRAIN TRAINABLE_KEY: the
names of the tensors that train this round}}.
Site -> coordinator: {"arrays" + "adapter-layout": the delta of exactly those tensors (train only), "metrics": MetricRecord
(num-examples, losses, timings incl. receive-/startup-seconds, counts), "site": ConfigRecord
{"name", "status"}}. Status "ok", or why no update
("data-error", "no-usable-examples", "no-eval-examples", "refused" with a "reason").

Under secure aggregation the TRAIN message also carries a "secagg" record, the reply carries a
"masked" vector instead of "arrays", and four more message types surround it
(train.advertise, train.share_keys, train.consistency, train.unmask): see fedtune.common.secagg.protocol.
"""

CONFIG_KEY = "fedtune-config"
ROUND_KEY = "server-round"
TRAINABLE_KEY = "trainable"
# Under differential privacy (TRAIN): how many sites the round was drawn from. With the config it
# fixes the sampling rate, hence the noise multiplier every site adds its share of.
DP_POPULATION_KEY = "dp-population"
