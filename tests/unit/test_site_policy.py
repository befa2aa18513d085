"""A site against a malicious coordinator (issue 15): the site's own policy, through the real handlers.

Each test plays the coordinator: it builds the Flower Message a coordinator would send (the run's
config JSON, the round, the global adapter, maybe a secure-aggregation record; through
fedtune.common.messages, as the coordinator does) with what an attacker would put in it, and hands it to client/app.py handle_train / handle_evaluate with the
policy ftclient builds from its flags. Each refusal must come before any training step (a spy on
train_local / train_round) and, for the model and path checks, before any model loads; its reason
goes back to the coordinator (a protocol reason) and into the site's own log."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from flwr.app import MessageType

from fedtune.client import app as client_app
from fedtune.client import policy as site_policy
from fedtune.client.app import handle_evaluate, handle_secure_stage, handle_train
from fedtune.client.policy import PERMISSIVE, SitePolicy, SiteRefusal, weights_sha256
from fedtune.common import messages, modeling, privacy
from fedtune.common.messages import AdvertiseRequest, RoundConfig, SecureTrainRequest, StageTask, TrainReply

from .test_client_app import (  # noqa: F401  (fixtures)
    SECRET,
    envelope,
    fresh_caches,
    global_state,
    message,
    site,
    write_site,
)

TAG = b"t" * 16  # a secure round's tag


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the site takes a training step; records that it was asked to."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the site trained before refusing")

    monkeypatch.setattr(client_app, "train_local", refuse)
    monkeypatch.setattr(client_app, "train_round", refuse)
    return calls


@pytest.fixture
def site_cache(tmp_path):
    return tmp_path / "site-cache"


def strict(tiny_model_dir, site_cache, **kw) -> SitePolicy:
    """ftclient's policy for a site whose operator put the run's (tiny) model under a --model-root."""
    kw.setdefault("model_roots", (tiny_model_dir,))
    return SitePolicy.strict(cache_dir=site_cache, **kw)


def train(
    cfg, state, tmp_path, policy, secure_record: bool = False, population: int | None = None, eval_: bool = False
):
    # A secure record for a round this site never had keys for: the policy must refuse first.
    request = SecureTrainRequest(TAG, [], []) if secure_record else None
    msg = message(cfg, state, 1, MessageType.EVALUATE if eval_ else MessageType.TRAIN, None, population, request)
    ctx = site(write_site(tmp_path / "bank.jsonl"), "bank")
    if eval_:
        return handle_evaluate(msg, ctx, None, "cpu", policy)
    return handle_train(msg, ctx, None, "cpu", policy=policy)


def refused(reply, needle: str) -> str:
    r = TrainReply.from_record(reply.content)  # an eval reply reads as one too: no update, num-examples
    assert r.site.status == "refused", r.site
    assert needle in r.site.reason, r.site.reason
    assert r.update is None and r.masked is None and r.metrics.num_examples == 0
    assert SECRET not in r.site.reason
    return r.site.reason


def status(reply) -> str:
    return messages.SiteStatus.from_record(reply.content[messages.SITE]).status


# ---------------------------------------------------------------------------------------------
# (a) plaintext rounds


def test_a_plaintext_train_is_refused_before_anything_loads(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, no_training, capsys
):
    reply = train(tiny_config, global_state, tmp_path, strict(tiny_model_dir, site_cache))
    reason = refused(reply, "only under secure aggregation")
    assert "--allow-plaintext" in reason
    assert client_app._RUNTIME is None and not no_training  # no model loaded, no step taken
    assert reason in capsys.readouterr().err  # and the site's own log says why


def test_a_config_that_turns_secure_aggregation_off_is_refused_even_with_a_record(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, no_training
):
    cfg = tiny_config.model_copy(deep=True)
    cfg.secure_aggregation.enabled = False
    refused(
        train(cfg, global_state, tmp_path, strict(tiny_model_dir, site_cache), secure_record=True),
        "only under secure aggregation",
    )
    assert client_app._RUNTIME is None


def test_allow_plaintext_lets_a_plaintext_round_train(tmp_path, tiny_config, tiny_model_dir, site_cache, global_state):
    reply = train(tiny_config, global_state, tmp_path, strict(tiny_model_dir, site_cache, allow_plaintext=True))
    assert status(reply) == "ok" and TrainReply.from_record(reply.content).update is not None


def test_ftsims_sites_and_the_default_policy_are_permissive(tmp_path, tiny_config, global_state):
    """ftsim's virtual sites allow plaintext (secure aggregation is off by default there)."""
    assert site_policy.active() is PERMISSIVE and PERMISSIVE.allow_plaintext and not PERMISSIVE.strict_paths
    reply = train(tiny_config, global_state, tmp_path, None)
    assert status(reply) == "ok"


# ---------------------------------------------------------------------------------------------
# (b) differential privacy below the site's minimum


def dp_config(tiny_config, **privacy_settings):
    doc = json.loads(tiny_config.to_json())
    doc["secure_aggregation"]["enabled"] = True
    doc["privacy"].update({"epsilon": 8.0, **privacy_settings})
    doc["federation"]["min_sites"] = 2
    return type(tiny_config).model_validate(doc)


def test_dp_off_is_refused_when_the_site_demands_dp(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, no_training
):
    pol = strict(tiny_model_dir, site_cache, min_noise_multiplier=1.0)
    refused(
        train(tiny_config, global_state, tmp_path, pol, secure_record=True),
        "requires differential privacy (noise multiplier at least 1)",
    )
    assert client_app._RUNTIME is None


def test_noise_below_the_sites_minimum_is_refused(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, no_training
):
    pol = strict(tiny_model_dir, site_cache, min_noise_multiplier=1.0)
    cfg = dp_config(tiny_config, noise_multiplier=0.3)
    reason = refused(train(cfg, global_state, tmp_path, pol, secure_record=True, population=3), "noise multiplier 0.3 ")
    assert "below this site's minimum 1" in reason and client_app._RUNTIME is None


def test_the_site_computes_the_multiplier_from_epsilon_and_population_as_privacy_does(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, no_training
):
    """No explicit multiplier: a huge epsilon calibrates to little noise; the site works it out
    from the config and the round's population (privacy.noise_multiplier) and refuses."""
    pol = strict(tiny_model_dir, site_cache, min_noise_multiplier=0.8)
    cfg = dp_config(tiny_config, epsilon=500.0)
    sigma = privacy.noise_multiplier(cfg, 3)
    assert sigma < 0.8
    refused(train(cfg, global_state, tmp_path, pol, secure_record=True, population=3), f"noise multiplier {sigma:.4g} ")
    # Enough noise passes the policy (the round then goes on to secure aggregation's own checks).
    pol.check_round(dp_config(tiny_config, noise_multiplier=1.2), secure=True, population=3)
    pol.check_round(dp_config(tiny_config, epsilon=1.0), secure=True, population=3)


def test_dp_without_a_population_or_in_a_plaintext_round_is_refused(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, no_training
):
    pol = strict(tiny_model_dir, site_cache, min_noise_multiplier=1.0, allow_plaintext=True)
    cfg = dp_config(tiny_config, noise_multiplier=5.0)
    refused(train(cfg, global_state, tmp_path, pol, secure_record=True), "names no site population")
    # Plaintext: the coordinator, not the site, would add the noise; a site that demands DP refuses.
    refused(
        train(cfg, global_state, tmp_path, pol, secure_record=False, population=3),
        "in a plaintext round the coordinator adds it",
    )


# ---------------------------------------------------------------------------------------------
# (c) the model: pinned name and pinned weights


def test_a_model_other_than_the_pinned_one_is_refused_before_it_loads(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, no_training
):
    other = tmp_path / "their-model"
    shutil.copytree(tiny_model_dir, other)
    pol = strict(tiny_model_dir, site_cache, allow_plaintext=True, model=str(tiny_model_dir), model_roots=(tmp_path,))
    cfg = tiny_config.model_copy(deep=True)
    cfg.model.name = str(other)
    refused(train(cfg, global_state, tmp_path, pol), "is not the model this site takes")
    assert client_app._RUNTIME is None
    refused(train(cfg, global_state, tmp_path, pol, eval_=True), "is not the model this site takes")


def test_weights_other_than_the_pinned_ones_are_refused_after_provisioning_before_loading(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, no_training, capsys, monkeypatch
):
    pol = strict(tiny_model_dir, site_cache, allow_plaintext=True, model_sha256="0" * 64)
    loads = []
    monkeypatch.setattr(client_app.methods, "load_model", lambda *a, **k: loads.append(1))
    refused(train(tiny_config, global_state, tmp_path, pol), "weights are not the ones this site pinned")
    refused(train(tiny_config, global_state, tmp_path, pol, eval_=True), "weights are not the ones this site pinned")
    assert not loads and client_app._RUNTIME is None
    assert weights_sha256(tiny_model_dir) in capsys.readouterr().err  # the site's log shows what it found


def test_the_pinned_weights_train_and_an_unpinned_site_logs_the_digest_to_pin(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, capsys
):
    digest = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert weights_sha256(tiny_model_dir) == digest  # one weights file: sha256sum of it
    reply = train(tiny_config, global_state, tmp_path, strict(tiny_model_dir, site_cache, allow_plaintext=True))
    assert status(reply) == "ok"
    assert (
        f"weights sha256 {digest} (pin it with --model {tiny_model_dir} --model-sha256 {digest})"
        in capsys.readouterr().err
    )
    pinned = strict(
        tiny_model_dir, site_cache, allow_plaintext=True, model=str(tiny_model_dir), model_sha256=digest.upper()
    )
    assert status(train(tiny_config, global_state, tmp_path, pinned)) == "ok"


def test_sharded_weights_digest_is_the_sha256_of_their_sha256sum_listing(tmp_path):
    for name, data in (
        ("model-00002-of-00002.safetensors", b"b"),
        ("model-00001-of-00002.safetensors", b"a"),
        ("config.json", b"{}"),
    ):
        (tmp_path / name).write_bytes(data)
    listing = "".join(
        f"{hashlib.sha256(d).hexdigest()}  model-0000{i}-of-00002.safetensors\n" for i, d in ((1, b"a"), (2, b"b"))
    )
    assert weights_sha256(tmp_path) == hashlib.sha256(listing.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# (d) paths: the coordinator's cache_dir, local model paths, every file name in the config


@pytest.fixture
def fake_default_model(monkeypatch, tiny_model_dir):
    """'default' provisions by copying the tiny model (no download, no real model): what lands where."""
    made = []

    def convert(gguf, out):
        made.append(out)
        shutil.copytree(tiny_model_dir, out)
        return out

    monkeypatch.setattr(modeling, "_find_default_gguf", lambda root: root / "gguf" / "fake.gguf")
    monkeypatch.setattr(modeling, "convert_gguf", convert)
    return made


def test_the_coordinators_cache_dir_is_ignored_and_the_site_provisions_in_its_own(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, fake_default_model, capsys
):
    evil = tmp_path / "coordinator-chosen" / "etc"
    cfg = tiny_config.model_copy(deep=True)
    cfg.model.name, cfg.model.cache_dir = "default", str(evil)
    reply = train(cfg, global_state, tmp_path, strict(tiny_model_dir, site_cache, allow_plaintext=True))
    assert status(reply) == "ok"
    assert not (tmp_path / "coordinator-chosen").exists()  # not even the provisioning lock file
    assert fake_default_model == [site_cache.resolve() / "models" / modeling.DEFAULT_DIRNAME]
    assert "ignoring the coordinator's model.cache_dir" in capsys.readouterr().err
    # Evaluation too.
    reply = train(cfg, global_state, tmp_path, strict(tiny_model_dir, site_cache), eval_=True)
    assert status(reply) == "ok" and not (tmp_path / "coordinator-chosen").exists()


def test_ftsims_permissive_sites_still_use_the_configs_cache_dir(
    tmp_path, tiny_config, global_state, fake_default_model
):
    """The simulator's own sites: the config is the user's, its cache_dir is honoured (as before)."""
    cfg = tiny_config.model_copy(deep=True)
    cfg.model.name, cfg.model.cache_dir = "default", str(tmp_path / "sim-cache")
    assert status(train(cfg, global_state, tmp_path, None)) == "ok"
    assert fake_default_model == [tmp_path / "sim-cache" / "models" / modeling.DEFAULT_DIRNAME]


@pytest.mark.parametrize("eval_", [False, True])
def test_a_local_model_path_outside_the_sites_folders_is_refused(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, no_training, eval_
):
    pol = SitePolicy.strict(
        cache_dir=site_cache, work_dir=tmp_path / "work", allow_plaintext=True
    )  # tiny_model_dir is not among them
    reply = train(tiny_config, global_state, tmp_path, pol, eval_=eval_)
    reason = refused(reply, "model.name is a local path outside this site's model folders")
    assert str(tiny_model_dir) not in reason  # nothing of the site's file system goes back
    assert client_app._RUNTIME is None
    # The same reason whether or not such a path exists: no oracle for the site's file system.
    cfg = tiny_config.model_copy(deep=True)
    cfg.model.name = "/no/such/place/model"
    assert refused(train(cfg, global_state, tmp_path, pol, eval_=eval_), "outside") == reason


def test_a_symlink_out_of_an_allowed_folder_is_refused(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, no_training
):
    root = tmp_path / "models"
    root.mkdir()
    os.symlink(tiny_model_dir, root / "innocent")
    pol = SitePolicy.strict(cache_dir=site_cache, model_roots=(root,), allow_plaintext=True)
    cfg = tiny_config.model_copy(deep=True)
    cfg.model.name = str(root / "innocent")
    refused(train(cfg, global_state, tmp_path, pol), "outside this site's model folders")
    cfg.model.name = str(root / ".." / ".." / tiny_model_dir.name)
    refused(train(cfg, global_state, tmp_path, pol), "outside this site's model folders")


def test_a_hub_model_and_a_gguf_file_escaping_its_folder_are_refused(
    tmp_path, tiny_config, tiny_model_dir, site_cache, global_state, no_training
):
    pol = strict(tiny_model_dir, site_cache, allow_plaintext=True)
    cfg = tiny_config.model_copy(deep=True)
    cfg.model.name = "attacker/exfiltrate-model"
    refused(train(cfg, global_state, tmp_path, pol), "would be fetched from a model hub")
    cfg = tiny_config.model_copy(deep=True)
    for bad in ("../../elsewhere.gguf", "/etc/passwd.gguf"):
        cfg.model.gguf_file = bad
        refused(train(cfg, global_state, tmp_path, pol), "model.gguf_file must name a file inside the model's folder")
    assert client_app._RUNTIME is None


def test_the_configs_other_file_names_are_blanked_for_the_site(tiny_config, tiny_model_dir, site_cache):
    doc = json.loads(tiny_config.to_json())
    doc["output"]["dir"] = "/etc/cron.d"
    doc["federation"]["sites"] = [{"name": "x", "train": "/etc/shadow", "eval": "/root/.ssh/id_rsa"}]
    doc["model"]["cache_dir"] = "/etc"
    used = strict(tiny_model_dir, site_cache).admit(type(tiny_config).model_validate(doc))
    assert used.output.dir is None and used.federation.sites == [] and used.model.cache_dir == str(site_cache.resolve())
    assert PERMISSIVE.admit(tiny_config) is tiny_config  # ftsim: untouched


def test_the_installed_policy_guards_the_key_advertisement_too(
    tmp_path, tiny_config, site_cache, monkeypatch, no_training
):
    """A secure round's key advertisement loads the site's data (and so the model) to report its
    example count: the policy ftclient installs for the process checks it there as well."""
    monkeypatch.setattr(
        site_policy, "_INSTALLED", SitePolicy.strict(cache_dir=site_cache)
    )  # the tiny model is outside its folders
    cfg = tiny_config.model_copy(deep=True)
    cfg.secure_aggregation.enabled = True
    task = StageTask(AdvertiseRequest(TAG, 1, 2, 0.1, 1000), RoundConfig(cfg, 1, []))
    msg = envelope(task.to_record(), messages.ADVERTISE)
    reply = messages.StageReply.from_record(
        handle_secure_stage(msg, site(write_site(tmp_path / "s.jsonl")), None, "cpu").content, messages.ADVERTISE
    )
    assert reply.site.status == "refused" and "outside this site's model folders" in reply.site.reason
    assert client_app._RUNTIME is None


def test_strict_policy_arguments_are_checked():
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        SitePolicy.strict(model_sha256="abc")
    with pytest.raises(ValueError, match="positive number"):
        SitePolicy.strict(min_noise_multiplier=0.0)
    assert issubclass(SiteRefusal, ValueError) and client_app.SiteRefusal is SiteRefusal


def test_provisioning_takes_a_gguf_file_name_only(tiny_model_dir):
    from fedtune.common.config import ModelConfig
    from fedtune.common.modeling import ModelError, resolve_model_source

    for bad in ("../x.gguf", "/etc/x.gguf", "sub/x.gguf", ".."):
        with pytest.raises(ModelError, match="must be a file name inside model.name"):
            resolve_model_source(ModelConfig(name=str(tiny_model_dir), gguf_file=bad))
