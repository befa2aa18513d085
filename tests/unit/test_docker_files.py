"""docker/: the compose demo's wiring and the Dockerfiles, checked without Docker.

This project's machines have a Docker client but no engine, so nothing here builds an image
or starts a container. Instead:

- compose.yaml is parsed service by service, and the `setup` service's script is run for real
  (ftserver init, ftclient keygen) with stand-in directories for its volumes. Each service's
  mounts are then laid out the same way (a symlink per mount target), and its command is
  checked against what it would see: the coordinator's certificates and authorized keys pass
  ftserver's own checks, each site's ca.crt, key and data pass ftclient's own checks, and no
  service can reach a secret or data it must not hold.
- Each Dockerfile is parsed: its COPY sources exist and pass .dockerignore, torch is pinned,
  the entry point is the right console script, the runtime user is not root, the model is
  provisioned at build time by code that still matches fedtune's API.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

# Its module fixtures are built once, on one worker, not once per worker.
pytestmark = pytest.mark.xdist_group("docker")

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
SITES = ("medical", "legal", "financial")
SERVICES = ("setup", "coordinator", *SITES)
RUNTIME_USER = "fedtune"

# Dockerfile -> the console script it must run. Every docker/Dockerfile* must be listed.
ENTRYPOINTS = {
    "Dockerfile.server": "ftserver",
    "Dockerfile.server.cuda": "ftserver",
    "Dockerfile.client": "ftclient",
    "Dockerfile.client.cuda": "ftclient",
    "Dockerfile.ftsim": "ftsim",
}
DEPLOYMENT = [n for n in ENTRYPOINTS if n != "Dockerfile.ftsim"]
TORCH_PIN = "torch==2.13.0"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


# ---------------------------------------------------------------------------------------------
# compose.yaml helpers


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value) -> str:
    """What compose makes of a value with an empty environment: ${VAR:-default} -> default, $$ -> $."""
    text = str(value).replace("$$", "\0")
    text = _VAR.sub(lambda m: m.group(2) or "", text)
    assert "$" not in text, f"{value!r}: a bare $ that compose would try to interpolate (write $$ for the shell)"
    return text.replace("\0", "$")


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def named(self) -> bool:
        return not self.source.startswith((".", "/", "~"))

    def host_path(self) -> Path:
        assert not self.named
        return (DOCKER / self.source).resolve()


def mounts(svc: dict) -> list[Mount]:
    out = []
    for v in svc.get("volumes", []):
        assert isinstance(v, str), f"expected the short volume syntax SOURCE:TARGET[:MODE], got {v!r}"
        parts = interpolate(v).split(":")
        assert len(parts) in (2, 3), v
        out.append(Mount(parts[0], parts[1], len(parts) == 3 and "ro" in parts[2].split(",")))
    targets = [m.target for m in out]
    assert len(targets) == len(set(targets)), f"two mounts on one target: {targets}"
    return out


def command(svc: dict) -> list[str]:
    cmd = svc.get("command")
    assert isinstance(cmd, list), "commands should be lists (exec form), not strings"
    return [interpolate(a) for a in cmd]


def flag(cmd: list[str], name: str) -> str:
    assert cmd.count(name) == 1, f"{name} should appear once in {cmd}"
    return cmd[cmd.index(name) + 1]


def mount_for(svc: dict, container_path: str) -> Mount:
    """The mount under which container_path lies (the deepest one)."""
    best = None
    for m in mounts(svc):
        if container_path == m.target or container_path.startswith(m.target.rstrip("/") + "/"):
            if best is None or len(m.target) > len(best.target):
                best = m
    assert best is not None, f"{container_path} is on no mounted volume"
    return best


def site_key_volume(compose: dict, site: str) -> str:
    m = mount_for(compose["services"][site], flag(command(compose["services"][site]), "--key"))
    assert m.named, f"{site}: its key should live in a named volume"
    return m.source


def ca_key_volume(compose: dict) -> str:
    """The volume setup runs `ftserver init` in: it holds ca.key."""
    m = re.search(r"ftserver init (\S+)", compose["services"]["setup"]["command"][0])
    assert m, "setup should make the certificates with ftserver init"
    vol = mount_for(compose["services"]["setup"], m.group(1))
    assert vol.named
    return vol.source


# ---------------------------------------------------------------------------------------------
# The deployment, simulated: setup's script run for real, then every service's view of it


class Deployment:
    def __init__(self, base: Path, compose: dict):
        self.base, self.compose = base, compose
        self.volumes = base / "volumes"
        self.binds = base / "binds"

    def host(self, m: Mount) -> Path:
        if m.named:
            p = self.volumes / m.source
        else:
            real = m.host_path()
            # Outputs the demo writes under docker/ (docker/runs) go to a scratch folder here;
            # other bind mounts (the sites' data) are the real, read-only folders.
            p = self.binds / real.relative_to(DOCKER) if real.is_relative_to(DOCKER) else real
            if p.is_file():  # a single file mounted (the coordinator's run config)
                return p
        p.mkdir(parents=True, exist_ok=True)
        return p

    def root(self, service: str) -> Path:
        """A folder standing for the service's file system: each mount target links to its volume."""
        root = self.base / "roots" / service
        if not root.exists():
            for m in mounts(self.compose["services"][service]):
                link = root / m.target.lstrip("/")
                link.parent.mkdir(parents=True, exist_ok=True)
                target = self.host(m)
                link.symlink_to(target, target_is_directory=target.is_dir())
        return root

    def path(self, service: str, container_path: str) -> Path:
        return self.root(service) / container_path.lstrip("/")

    def files(self, service: str) -> list[Path]:
        """Every file the service can reach through its mounts."""
        root = self.root(service)
        return [Path(d) / f for d, _, names in os.walk(root, followlinks=True) for f in names]


def setup_script(compose: dict) -> str:
    svc = compose["services"]["setup"]
    cmd = svc["command"]
    assert isinstance(cmd, list) and len(cmd) == 1, "setup's command should be one shell script"
    return interpolate(cmd[0])


def run_setup(dep: Deployment) -> None:
    svc = dep.compose["services"]["setup"]
    script = setup_script(dep.compose)
    root = dep.root("setup")
    tops = sorted({m.target.strip("/").split("/")[0] for m in mounts(svc)}, key=len, reverse=True)
    # Every absolute path on a mounted folder moves under the stand-in root.
    pattern = re.compile(r"(?<![\w./$-])/(" + "|".join(map(re.escape, tops)) + r")(?=/|[^\w.-]|$)")
    script = pattern.sub(lambda m: f"{root}/{m.group(1)}", script)
    assert f"{RUNTIME_USER}:{RUNTIME_USER}" in script, "setup should hand the files to the images' user"
    script = script.replace(f"{RUNTIME_USER}:{RUNTIME_USER}", f"{os.getuid()}:{os.getgid()}")
    bindir = str(Path(sys.executable).parent)
    path = bindir + os.pathsep + os.environ.get("PATH", "")
    for tool in ("ftserver", "ftclient"):
        if shutil.which(tool, path=path) is None:
            pytest.skip(f"{tool} is not installed beside {sys.executable}")
    entry = svc["entrypoint"]
    r = subprocess.run([*entry, script], env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"setup failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def deployment(compose, tmp_path_factory) -> Deployment:
    dep = Deployment(tmp_path_factory.mktemp("compose"), compose)
    run_setup(dep)
    dep.first = snapshot(dep.volumes)
    run_setup(dep)  # a second `up`: nothing may be made again
    dep.second = snapshot(dep.volumes)
    return dep


# ---------------------------------------------------------------------------------------------
# compose.yaml: structure


def test_compose_has_the_services(compose):
    assert set(SERVICES) <= set(compose["services"])


BUILDS = [("setup", "Dockerfile.server"), ("coordinator", "Dockerfile.server")] + [
    (s, "Dockerfile.client") for s in SITES
]


@pytest.mark.parametrize("service,dockerfile", BUILDS)
def test_services_build_from_the_cpu_images(compose, service, dockerfile):
    build = compose["services"][service]["build"]
    assert (DOCKER / interpolate(build["context"])).resolve() == REPO, "the build context is the repository root"
    assert build["dockerfile"] == f"docker/{dockerfile}"
    assert (REPO / build["dockerfile"]).is_file()
    assert compose["services"][service]["image"].split(":")[0] == (
        "fedtune-server" if "server" in dockerfile else "fedtune-client"
    )


def test_everything_waits_for_setup(compose):
    for name in ("coordinator", *SITES):
        deps = compose["services"][name].get("depends_on")
        assert isinstance(deps, dict) and deps.get("setup", {}).get("condition") == "service_completed_successfully", (
            name
        )


def test_sites_wait_for_a_healthy_coordinator(compose):
    coord = compose["services"]["coordinator"]
    test = coord["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "8000" in " ".join(test)
    for site in SITES:
        assert compose["services"][site]["depends_on"]["coordinator"]["condition"] == "service_healthy", site


def test_setup_is_a_shell_script_that_compose_leaves_alone(compose):
    svc = compose["services"]["setup"]
    assert svc["entrypoint"][0] == "sh", "setup overrides the image's entry point with sh"
    raw = svc["command"][0]
    assert "$" not in raw.replace("$$", ""), "a single $ in setup's script would be interpolated by compose"
    r = subprocess.run(["sh", "-n", "-c", interpolate(raw)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for site in SITES:  # the three site names it loops over
        assert site in raw


def test_coordinator_command(compose):
    svc = compose["services"]["coordinator"]
    cmd = command(svc)
    assert "--insecure" not in cmd
    assert flag(cmd, "--host") == "0.0.0.0"
    assert flag(cmd, "--port") == "8000"
    for name in ("--certs", "--authorized-keys"):
        m = mount_for(svc, flag(cmd, name))
        assert m.named and m.read_only, f"{name} should be a read-only volume"
    out = mount_for(svc, flag(cmd, "--out"))
    assert not out.named and not out.read_only, "--out should be a writable bind mount (the runs dir)"
    assert out.host_path() == DOCKER / "runs"
    assert "runs/" in (DOCKER / ".gitignore").read_text().split(), "docker/runs/ should be git-ignored"


@pytest.mark.parametrize("site", SITES)
def test_site_command(compose, site):
    svc = compose["services"][site]
    cmd = command(svc)
    assert "--insecure" not in cmd
    assert flag(cmd, "--server") == "coordinator:8000"
    assert flag(cmd, "--name") == site
    for name in ("--ca-cert", "--key"):
        m = mount_for(svc, flag(cmd, name))
        assert m.named and m.read_only, f"{site}: {name} should come from a read-only volume"
    for name in ("--data", "--eval-data"):
        m = mount_for(svc, flag(cmd, name))
        assert not m.named and m.read_only, f"{site}: {name} should be on a read-only bind mount"
        assert m.host_path() == REPO / "simulations" / "data" / site, f"{site} should get its own sample data"
        assert (m.host_path() / Path(flag(cmd, name)).relative_to(m.target)).is_file()


@pytest.mark.parametrize("site", SITES)
def test_site_mounts_no_other_secret(compose, site):
    names = {m.source for m in mounts(compose["services"][site]) if m.named}
    others = {site_key_volume(compose, s) for s in SITES if s != site}
    assert not names & others, f"{site} mounts another site's key volume"
    assert ca_key_volume(compose) not in names, f"{site} mounts the volume that holds ca.key"
    coordinator_certs = mount_for(
        compose["services"]["coordinator"], flag(command(compose["services"]["coordinator"]), "--certs")
    ).source
    assert coordinator_certs not in names, f"{site} mounts the coordinator's server.key"


def test_coordinator_offers_only_the_gateway_port(compose):
    # ftserver's gateway listens on --port; the SuperLink (Control and Runtime APIs) on the
    # container's 127.0.0.1 only. Nothing else may be published or exposed.
    svc = compose["services"]["coordinator"]
    port = flag(command(svc), "--port")
    for spec in [*svc.get("ports", []), *svc.get("expose", [])]:
        target = spec.get("target") if isinstance(spec, dict) else str(spec).rsplit(":", 1)[-1].split("/")[0]
        assert str(target) == port, f"coordinator publishes {spec}: only the gateway port {port} may be offered"
    assert f"'127.0.0.1', {port}" in " ".join(svc["healthcheck"]["test"]), (
        "the healthcheck should probe the gateway port"
    )
    for name in ("Dockerfile.server", "Dockerfile.server.cuda"):
        assert [e.split() for e in all_of(DOCKER / name, "EXPOSE")] == [[port]], (
            f"{name} exposes more than the gateway port"
        )


def test_coordinator_mounts_no_site_key_or_data(compose):
    svc = compose["services"]["coordinator"]
    names = {m.source for m in mounts(svc) if m.named}
    assert not names & {site_key_volume(compose, s) for s in SITES}
    assert ca_key_volume(compose) not in names, "ca.key stays with setup (offline, in a real deployment)"
    data = REPO / "simulations" / "data"
    for m in mounts(svc):
        if not m.named:
            assert not m.host_path().is_relative_to(data) and not data.is_relative_to(m.host_path()), (
                f"coordinator mounts site data: {m}"
            )


# ---------------------------------------------------------------------------------------------
# compose.yaml: the deployment, simulated


def test_setup_makes_everything_once(deployment):
    assert deployment.first, "setup wrote nothing"
    assert deployment.first == deployment.second, "a second setup run must keep the existing CA and keys"


def test_coordinator_accepts_what_setup_made(deployment):
    from fedtune.server.cli import CERT_FILES, build_parser, check_network

    args = build_parser().parse_args(command(deployment.compose["services"]["coordinator"]))
    certs = deployment.path("coordinator", args.certs)
    keys = deployment.path("coordinator", args.authorized_keys)
    net = check_network(
        {
            "certs": str(certs),
            "authorized_keys": str(keys),
            "insecure": args.insecure,
            "host": args.host,
            "port": args.port,
        }
    )
    assert net["certs"] and net["authorized_keys"]
    assert {f.name for f in certs.iterdir()} == set(CERT_FILES), (
        "the coordinator gets ca.crt, server.crt, server.key and nothing else"
    )
    assert sorted(p.stem for p in keys.glob("*.pub")) == sorted(SITES)


def test_coordinator_can_reach_no_site_secret_or_data(deployment):
    names = [p.name for p in deployment.files("coordinator")]
    assert "site_key" not in names
    assert "ca.key" not in names
    assert not [n for n in names if n.endswith((".jsonl", ".csv", ".parquet"))]


@pytest.mark.parametrize("site", SITES)
def test_site_can_reach_only_its_own_secret(deployment, site):
    own_key = deployment.path(site, flag(command(deployment.compose["services"][site]), "--key")).read_bytes()
    for p in deployment.files(site):
        assert p.name not in ("ca.key", "server.key"), f"{site} can read {p.name}"
        if p.name == "site_key":
            assert p.read_bytes() == own_key, f"{site} can read another site's private key"


@pytest.mark.parametrize("site", SITES)
def test_site_accepts_what_setup_made_and_is_authorized(deployment, site):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fedtune.client.join import check_inputs, join_parser

    # The site's command as ftclient itself parses it, with its paths seen from the host.
    args = join_parser().parse_args(command(deployment.compose["services"][site]))
    for attr in ("data", "eval_data", "ca_cert", "key"):
        setattr(args, attr, str(deployment.path(site, getattr(args, attr))))
    name, counts = check_inputs(args)
    assert name == site and counts["--data"][0] > 0 and counts["--eval-data"][0] > 0

    # Its key is the one the coordinator registers under its name.
    coord_cmd = command(deployment.compose["services"]["coordinator"])
    authorized = deployment.path("coordinator", flag(coord_cmd, "--authorized-keys")) / f"{site}.pub"
    openssh = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private = serialization.load_ssh_private_key(Path(args.key).read_bytes(), None)
    assert private.public_key().public_bytes(*openssh) == serialization.load_ssh_public_key(
        authorized.read_bytes()
    ).public_bytes(*openssh)

    # The coordinator's certificate is issued by the CA the site trusts, for the host it dials.
    ca = x509.load_pem_x509_certificate(Path(args.ca_cert).read_bytes())
    server = x509.load_pem_x509_certificate(
        (deployment.path("coordinator", flag(coord_cmd, "--certs")) / "server.crt").read_bytes()
    )
    server.verify_directly_issued_by(ca)
    dns = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert args.server.rsplit(":", 1)[0] in dns


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or (not line.strip() and not buf):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        full = (buf + line).strip()
        buf = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not buf, f"{path.name}: ends inside a continued line"
    return out


def all_of(path: Path, word: str) -> list[str]:
    return [rest for w, rest in instructions(path) if w == word]


def base_image(path: Path) -> str:
    args = {}
    for w, rest in instructions(path):
        if w == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
        if w == "FROM":
            image = rest.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
    raise AssertionError(f"{path.name}: no FROM")


def dockerignore_allows(rel: str) -> bool:
    """Docker's .dockerignore rules, enough for top-level paths: the last matching line wins."""

    def match(pat: str, path: str) -> bool:
        parts = path.split("/")
        if pat.startswith("**/"):
            return any(match(pat[3:], "/".join(parts[i:])) for i in range(len(parts)))
        pp = pat.split("/")
        return len(parts) >= len(pp) and all(fnmatchcase(a, b) for a, b in zip(parts, pp))

    ignore = REPO / ".dockerignore"
    allowed = True
    if ignore.is_file():
        for line in ignore.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            pat = line[1:].strip().strip("/") if neg else line.strip("/")
            if match(pat, rel):
                allowed = neg
    return allowed


def test_every_dockerfile_is_checked():
    found = {p.name for p in DOCKER.glob("Dockerfile*")}
    assert found == set(ENTRYPOINTS), f"unexpected or missing Dockerfiles: {found ^ set(ENTRYPOINTS)}"


@pytest.mark.parametrize("name", sorted(ENTRYPOINTS))
def test_copy_sources_exist_and_reach_the_build(name):
    copies = all_of(DOCKER / name, "COPY") + all_of(DOCKER / name, "ADD")
    assert copies, f"{name}: copies nothing"
    for rest in copies:
        tokens = [t for t in shlex.split(rest) if not t.startswith("--")]
        assert "--from" not in rest, f"{name}: multi-stage COPY not expected: {rest}"
        *sources, dest = tokens
        assert sources and dest, rest
        for src in sources:
            assert not src.startswith(("/", "..")), f"{name}: {src} is outside the build context"
            assert (REPO / src).exists(), f"{name}: COPY {src}: no such path in the repository"
            assert dockerignore_allows(src.rstrip("/")), f"{name}: COPY {src} is excluded by .dockerignore"


def test_the_build_context_leaves_out_the_bulk():
    for heavy in (".venv", ".git", "tests", "benchmarks", "docker/runs", "ftsim-runs", "fedtune.egg-info"):
        assert not dockerignore_allows(heavy), f".dockerignore should keep {heavy} out of the build context"


@pytest.mark.parametrize("name", DEPLOYMENT)
def test_deployment_images_copy_what_the_install_needs(name):
    sources = set()
    for rest in all_of(DOCKER / name, "COPY"):
        *src, _ = [t for t in shlex.split(rest) if not t.startswith("--")]
        sources |= {s.rstrip("/") for s in src}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert sources == {"pyproject.toml", "README.md"} | package_dirs, f"{name}: copies {sorted(sources)}"


@pytest.mark.parametrize("name", sorted(ENTRYPOINTS))
def test_torch_is_pinned(name):
    installs = [r for r in all_of(DOCKER / name, "RUN") if "pip install" in r]
    torch_tokens = [t for r in installs for t in shlex.split(r) if re.match(r"['\"]?torch\b", t)]
    assert torch_tokens, f"{name}: installs no torch explicitly"
    assert set(torch_tokens) == {TORCH_PIN}, f"{name}: torch should be pinned as {TORCH_PIN}, found {torch_tokens}"


@pytest.mark.parametrize("name", DEPLOYMENT)
def test_base_image_and_torch_build(name):
    torch_run = next(r for r in all_of(DOCKER / name, "RUN") if TORCH_PIN in r)
    base = base_image(DOCKER / name)
    if name.endswith(".cuda"):
        assert base.startswith("nvidia/cuda:"), f"{name}: FROM {base}"
        assert CPU_TORCH_INDEX not in torch_run, f"{name}: installs the CPU build of torch"
        assert any("python3.11" in r for r in all_of(DOCKER / name, "RUN")), f"{name}: no Python 3.11"
    else:
        assert base == "python:3.11-slim", f"{name}: FROM {base}"
        assert f"--index-url {CPU_TORCH_INDEX}" in torch_run, f"{name}: torch should come from the CPU index"


@pytest.mark.parametrize("name", sorted(ENTRYPOINTS))
def test_entrypoint(name):
    entries = all_of(DOCKER / name, "ENTRYPOINT")
    assert entries, f"{name}: no ENTRYPOINT"
    assert json.loads(entries[-1]) == [ENTRYPOINTS[name]], f"{name}: ENTRYPOINT {entries[-1]} (exec form expected)"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert ENTRYPOINTS[name] in scripts


@pytest.mark.parametrize("name", DEPLOYMENT)
def test_runs_as_the_non_root_user(name):
    path = DOCKER / name
    users = all_of(path, "USER")
    assert users and users[-1] == RUNTIME_USER, f"{name}: should end as USER {RUNTIME_USER}"
    assert any("useradd" in r and RUNTIME_USER in r for r in all_of(path, "RUN")), (
        f"{name}: creates no user {RUNTIME_USER}"
    )
    env = " ".join(all_of(path, "ENV"))
    assert re.search(r"\bFEDTUNE_CACHE=/cache\b", env), f"{name}: FEDTUNE_CACHE should be /cache"


@pytest.mark.parametrize("name", DEPLOYMENT)
def test_exposed_port(name):
    exposed = " ".join(all_of(DOCKER / name, "EXPOSE")).split()
    assert exposed == (["8000"] if ENTRYPOINTS[name] == "ftserver" else [])


@pytest.mark.parametrize("name", DEPLOYMENT)
def test_model_is_provisioned_at_build_time_by_code_that_still_runs(name, monkeypatch):
    import fedtune.common.modeling as modeling
    from fedtune.common.config import DEFAULT_MODEL, ModelConfig

    ins = instructions(DOCKER / name)
    runs = [(i, rest) for i, (w, rest) in enumerate(ins) if w == "RUN" and "resolve_model_source" in rest]
    assert len(runs) == 1, f"{name}: one RUN should provision the model"
    index, rest = runs[0]
    user_at = max(i for i, (w, r) in enumerate(ins) if w == "USER" and i < index)
    assert ins[user_at][1] == RUNTIME_USER, f"{name}: provision the model as {RUNTIME_USER}, who must own the cache"
    tokens = shlex.split(rest)
    code = tokens[tokens.index("-c") + 1]

    calls = []

    def fake(cfg):
        calls.append(cfg)
        return "/cache/models/x", True

    assert list(inspect.signature(modeling.resolve_model_source).parameters) == ["cfg"]
    monkeypatch.setattr(modeling, "resolve_model_source", fake)
    exec(compile(code, f"{name}:RUN", "exec"), {"__name__": "__docker__"})
    assert len(calls) == 1 and isinstance(calls[0], ModelConfig) and calls[0].name == DEFAULT_MODEL


def test_readme_covers_the_images_and_the_demo():
    text = (DOCKER / "README.md").read_text()
    for name in ENTRYPOINTS:
        assert f"docker/{name}" in text or name in text, name
    assert "docker compose -f docker/compose.yaml up" in text
    assert "A real deployment" in text
