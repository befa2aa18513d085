"""What a site enforces against its coordinator (issue 15): the site's own policy, from its own flags.

Every message a site receives may come from a curious or malicious coordinator, and each carries
the run's whole configuration (FedTuneConfig JSON). A site that trusted it would send a plaintext
update when asked, add whatever DP noise it is told to (or none), load any model it is named,
and provision files wherever ``model.cache_dir`` points. A :class:`SitePolicy` is built at the
site from the operator's flags (``ftclient --allow-plaintext --min-noise-multiplier X --model M
--model-sha256 H --cache-dir D --model-root R``), never from a message, and is checked before
any training step; a refusal names its reason in the site's own log and in the reply (a protocol
reason: the coordinator's own settings, never the site's data or paths).

- plaintext: a TRAIN without the secure-aggregation record, or a config with
  ``secure_aggregation.enabled`` false, is refused unless the operator allowed plaintext rounds;
- DP: with a minimum noise multiplier the site computes the multiplier it would add from the
  config and the round's population, as :mod:`fedtune.common.privacy` does, and refuses a round
  below it, a round with DP off, and a plaintext round (there the coordinator adds the noise);
- the model: a pinned name must be the run's; pinned weights (sha256) must be the weights that
  load, checked after provisioning and before loading; unpinned, the site logs the digest so its
  operator can pin it next time;
- paths: the coordinator's ``model.cache_dir`` is ignored (the site's own cache is used), a local
  model path must lie inside the site's cache, work folder or a ``--model-root``, a hub model is
  taken only when the operator named it (it reaches the network), and the config's other file
  names (``output.dir``, ``federation.sites``), which a site never needs, are blanked.

ftsim's virtual sites are the simulator's own: their default is :data:`PERMISSIVE`, today's
behaviour. ftclient builds the strict one (:meth:`SitePolicy.strict`) and :func:`install`s it
for the process, so every path that loads a model (training, evaluation, a secure round's key
advertisement) is checked by it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.common import privacy
from fedtune.common.config import DEFAULT_MODEL, FedTuneConfig

log = logging.getLogger("fedtune.client")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class SiteRefusal(ValueError):
    """This site cannot take part in the run as configured (the reason goes to the coordinator)."""


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _resolved(name: str) -> Path:
    """``name`` as an absolute path with every symlink followed (the path need not exist)."""
    return Path(os.path.abspath(Path(name).expanduser())).resolve()


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime): a resident site checks every round for a stat."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def weights_sha256(folder: str | Path) -> str | None:
    """The digest a site pins with ``--model-sha256``: of the model folder's one weights file, the
    file's sha256 (``sha256sum model.safetensors``); of several (shards), the sha256 of their
    ``sha256sum`` listing in name order (``sha256sum *.safetensors | sha256sum``). None: no weights file."""
    files = sorted(
        (p for p in Path(folder).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES),
        key=lambda p: p.name.encode(),
    )
    if not files:
        return None
    if len(files) == 1:
        return file_sha256(files[0])
    listing = "".join(f"{file_sha256(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


@dataclass(frozen=True)
class SitePolicy:
    """A site's own rules for what a coordinator may ask of it. The defaults are permissive (ftsim)."""

    allow_plaintext: bool = True
    min_noise_multiplier: float | None = None  # None: DP not required
    model: str | None = None  # the one model.name this site takes; None: the run's (its sha256 logged)
    model_sha256: str | None = None  # the weights this site takes (see weights_sha256); None: any
    cache_dir: str | None = None  # the site's own cache, used instead of the coordinator's model.cache_dir
    model_roots: tuple[str, ...] | None = None  # local model paths must lie under one of these; None: anywhere
    say: object = field(default=None, compare=False, repr=False)  # where the site's own log goes (default: stderr)
    _logged: set = field(default_factory=set, compare=False, repr=False)  # weights whose digest this site has logged

    @classmethod
    def strict(
        cls,
        *,
        allow_plaintext: bool = False,
        min_noise_multiplier: float | None = None,
        model: str | None = None,
        model_sha256: str | None = None,
        cache_dir: str | Path | None = None,
        work_dir: str | Path | None = None,
        model_roots: tuple[str | Path, ...] | list = (),
        say=None,
    ) -> SitePolicy:
        """ftclient's policy: the site's cache (``cache_dir``, else $FEDTUNE_CACHE or ~/.cache/fedtune),
        its work folder and ``model_roots`` are where a local model may be; a pinned local model is too."""
        from fedtune.common.modeling import cache_root

        if min_noise_multiplier is not None and not (math.isfinite(min_noise_multiplier) and min_noise_multiplier > 0):
            raise ValueError(f"minimum noise multiplier {min_noise_multiplier}: expected a positive number")
        if model_sha256 is not None and not _SHA256.match(model_sha256.lower()):
            raise ValueError("model sha256: expected 64 hexadecimal digits (sha256sum's output)")
        cache = _resolved(str(cache_dir)) if cache_dir else _resolved(str(cache_root()))
        roots = [cache, *(_resolved(str(r)) for r in model_roots)]
        if work_dir:
            roots.append(_resolved(str(work_dir)))
        if model and model != DEFAULT_MODEL and (not _HUB_ID.match(model) or Path(model).expanduser().exists()):
            roots.append(_resolved(model))  # the operator's own model path
        return cls(
            allow_plaintext=allow_plaintext,
            min_noise_multiplier=min_noise_multiplier,
            model=model,
            model_sha256=model_sha256.lower() if model_sha256 else None,
            cache_dir=str(cache),
            model_roots=tuple(dict.fromkeys(str(r) for r in roots)),
            say=say,
        )

    @property
    def strict_paths(self) -> bool:
        return self.model_roots is not None

    def _say(self, text: str) -> None:
        if callable(self.say):
            self.say(text)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] site policy: {text}", file=sys.stderr, flush=True)

    def describe(self) -> list[str]:
        """The policy in a few lines, for the site's log when it starts."""
        lines = [
            "plaintext rounds: "
            + (
                "allowed (--allow-plaintext)"
                if self.allow_plaintext
                else "refused: updates leave only under secure aggregation"
            ),
            "differential privacy: "
            + (
                f"required, noise multiplier at least {self.min_noise_multiplier:g}"
                if self.min_noise_multiplier is not None
                else "not required"
            ),
            "model: "
            + (f"only {self.model}" if self.model else "the run's (its weights' sha256 is logged)")
            + (f", weights sha256 {self.model_sha256}" if self.model_sha256 else ""),
        ]
        if self.strict_paths:
            lines.append(f"model cache: {self.cache_dir} (the coordinator's model.cache_dir is ignored)")
            lines.append("local model paths only under: " + ", ".join(self.model_roots))
        return lines

    # ---- the round: plaintext and DP (TRAIN only; evaluation sends no update)

    def check_round(self, cfg: FedTuneConfig, secure: bool, population: int) -> None:
        """Before training: may this site's update leave as the round asks? SiteRefusal if not."""
        plaintext = not secure or cfg.secure_aggregation.enabled is False
        if plaintext and not self.allow_plaintext:
            raise SiteRefusal(
                "site policy: this site sends updates only under secure aggregation, and the round is plaintext "
                "(its operator can allow plaintext rounds with ftclient --allow-plaintext)"
            )
        want = self.min_noise_multiplier
        if want is None:
            return
        if not cfg.privacy.enabled:
            raise SiteRefusal(
                f"site policy: this site requires differential privacy (noise multiplier at least {want:g}), and the run has it off"
            )
        if plaintext:
            raise SiteRefusal(
                "site policy: this site requires differential privacy noise it adds itself, and in a plaintext round "
                "the coordinator adds it: run with secure aggregation"
            )
        if population < 1:
            raise SiteRefusal(
                "site policy: differential privacy: the round names no site population, so the noise cannot be sized"
            )
        sigma = privacy.noise_multiplier(cfg, population)
        if not sigma >= want:
            raise SiteRefusal(
                f"site policy: the run's differential privacy noise multiplier {sigma:.4g} (privacy.epsilon {cfg.privacy.epsilon:g} "
                f"over {cfg.federation.rounds} rounds, {population} sites) is below this site's minimum {want:g}"
            )

    # ---- the model and every path the config names (TRAIN, EVALUATE and a secure round's advertisement)

    def admit(self, cfg: FedTuneConfig) -> FedTuneConfig:
        """The config as this site uses it: its own cache, the config's file names it never needs
        blanked, and the model checked against the pin and the allowed folders. SiteRefusal if not."""
        name = cfg.model.name
        if self.model is not None and not _same_model(name, self.model):
            raise SiteRefusal(
                f"site policy: the run's model.name {_shown(name)} is not the model this site takes (ftclient --model)"
            )
        if not self.strict_paths:
            return cfg
        roots = tuple(Path(r) for r in self.model_roots)
        if name != DEFAULT_MODEL:
            pinned = self.model is not None  # the operator named this model: its path, or a hub id, is theirs
            local = _resolved(name)
            if not pinned and not (_under(local, roots) and local.exists()):
                # The reason does not depend on whether a path outside the site's folders exists.
                if _HUB_ID.match(name):
                    raise SiteRefusal(
                        f"site policy: model.name {_shown(name)} would be fetched from a model hub; this site takes a hub "
                        "model only when its operator names it (ftclient --model)"
                    )
                raise SiteRefusal(
                    "site policy: model.name is a local path outside this site's model folders (its cache, work folder and --model-root)"
                )
            if cfg.model.gguf_file is not None:
                inner = _resolved(str(Path(name).expanduser() / cfg.model.gguf_file))
                allowed = roots + ((local,) if pinned else ())
                if Path(cfg.model.gguf_file).name != cfg.model.gguf_file or not _under(inner, allowed):
                    raise SiteRefusal("site policy: model.gguf_file must name a file inside the model's folder")
        if cfg.model.cache_dir not in (None, self.cache_dir):
            self._say("ignoring the coordinator's model.cache_dir: this site provisions models in its own cache")
        model = cfg.model.model_copy(update={"cache_dir": self.cache_dir})
        output = cfg.output.model_copy(update={"dir": None})
        federation = cfg.federation.model_copy(update={"sites": []})
        return cfg.model_copy(update={"model": model, "output": output, "federation": federation})

    def check_weights(self, cfg: FedTuneConfig) -> None:
        """After provisioning, before the weights load: are they the pinned ones? Unpinned, the
        digest is logged (once per weights) for the operator to pin. Permissive policy: nothing."""
        if not self.strict_paths and self.model_sha256 is None:
            return
        from fedtune.common.modeling import resolve_model_source

        source, is_local = resolve_model_source(cfg.model)  # provisions the default model into the site's cache
        digest = weights_sha256(source) if is_local else _hub_digest(source)
        if self.model_sha256 is not None and digest != self.model_sha256:
            self._say(
                f"model {cfg.model.name}: weights sha256 {digest or 'unknown'} is not the pinned {self.model_sha256}"
            )
            raise SiteRefusal(
                "site policy: the model's weights are not the ones this site pinned (ftclient --model-sha256)"
            )
        if (source, digest) not in self._logged:  # once per weights, not every round
            self._logged.add((source, digest))
            if digest is None:
                self._say(f"model {cfg.model.name}: no weights file found to hash in {source}")
            elif self.model_sha256 is None:
                self._say(
                    f"model {cfg.model.name}: weights sha256 {digest} (pin it with --model {cfg.model.name} --model-sha256 {digest})"
                )
            else:
                self._say(f"model {cfg.model.name}: weights sha256 {digest}, as pinned")


def _same_model(name: str, pinned: str) -> bool:
    if name == pinned:
        return True
    if DEFAULT_MODEL in (name, pinned):
        return False
    return _resolved(name) == _resolved(pinned)


def _shown(name: str) -> str:
    """The coordinator's own model name, back to it: short and on one line."""
    text = re.sub(r"[^\x20-\x7e]", "?", name)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _hub_digest(repo: str) -> str | None:
    """The weights digest of a hub model already in the local Hugging Face cache (None if it is not there)."""
    try:
        from huggingface_hub import snapshot_download

        return weights_sha256(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or no hub library: the digest is unknown
        return None


PERMISSIVE = SitePolicy()
_INSTALLED: SitePolicy = PERMISSIVE


def install(policy: SitePolicy) -> None:
    """Make ``policy`` this process's site policy (ftclient does, once, at start): every handler
    that is not handed one explicitly uses it."""
    global _INSTALLED
    _INSTALLED = policy


def active() -> SitePolicy:
    return _INSTALLED
