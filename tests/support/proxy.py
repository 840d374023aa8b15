"""The compose deployment's reverse proxy, run for real: the nginx binary with deploy/nginx
rendered the way the nginx image renders it (envsubst of the SPARSEGPT_* variables over
templates/ into conf.d/, NGINX_ENVSUBST_FILTER=^SPARSEGPT_), with the values docker-compose.yml
gives the proxy service, except the ports (free unprivileged ones), the upstream (the test's
API) and whatever a test overrides. No directive is copied here: only temp paths, pid and user,
which the image has built in, come from the command line and conf.d/test-paths.conf."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support.paths import REPO
from tests.support.processes import free_port

COMPOSE = REPO / "docker-compose.yml"
NGINX_DIR = REPO / "deploy" / "nginx"
MAIN_CONF = NGINX_DIR / "nginx.conf"
TEMPLATES = NGINX_DIR / "templates"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/local/nginx/sbin")

_COMPOSE_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
_ENVSUBST_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / $$, from ``env`` (default: none set)."""
    env = env or {}

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1)) or (match.group(2) or "")

    return _COMPOSE_VAR.sub(one, value)


def compose_proxy_env() -> dict[str, str]:
    """The proxy service's environment as compose passes it with nothing set in the shell."""
    environment = compose()["services"]["proxy"]["environment"]
    return {key: interpolate(str(value)) for key, value in environment.items()}


def render(out: Path, env: dict[str, str]) -> None:
    """What the image's 20-envsubst-on-templates.sh does: every templates/**/X.template to
    out/**/X, the variables matching NGINX_ENVSUBST_FILTER replaced, anything else left as is."""
    pattern = re.compile(env.get("NGINX_ENVSUBST_FILTER", ""))
    defined = {name: value for name, value in env.items() if pattern.search(name)}

    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return defined[name] if name in defined else match.group(0)

    for template in TEMPLATES.rglob("*.template"):
        target = out / template.relative_to(TEMPLATES).with_suffix("")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_ENVSUBST_VAR.sub(one, template.read_text(encoding="utf-8")), encoding="utf-8")


def make_certificate(directory: Path, name: str = "sparsegpt.test") -> Path:
    """A self-signed certificate for ``name`` and 127.0.0.1 as certs/fullchain.pem + privkey.pem."""
    openssl = shutil.which("openssl")
    assert openssl, "the TLS checks need the openssl command (apt-get install openssl)"
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(directory / "privkey.pem"),
            "-out",
            str(directory / "fullchain.pem"),
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name},IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return directory / "fullchain.pem"


@dataclass
class Proxy:
    root: Path
    env: dict[str, str]
    proc: subprocess.Popen

    @property
    def http_port(self) -> int:
        return int(self.env["SPARSEGPT_HTTP_PORT"])

    @property
    def https_port(self) -> int:
        return int(self.env["SPARSEGPT_HTTPS_PORT"])

    @property
    def base(self) -> str:
        if self.env["SPARSEGPT_TLS"] == "on":
            return f"https://127.0.0.1:{self.https_port}"
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def access_log(self) -> list[str]:
        return (self.root / "access.log").read_text(errors="replace").splitlines()

    def log_line(self, marker: str, timeout: float = 5) -> str:
        """The access-log line of the request whose target contains ``marker`` (nginx writes it
        when the request ends)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.access_log() if marker in line]
            if lines:
                return lines[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no access-log line with {marker!r}:\n" + "\n".join(self.access_log()[-20:]))
            time.sleep(0.05)

    def error_log(self) -> str:
        return (self.root / "error.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # nginx: fast shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=5)


def prepare(root: Path, env: dict[str, str]) -> list[str]:
    """deploy/nginx rendered under ``root`` with ``env``; the nginx command line that runs it."""
    assert NGINX, "the proxy checks need the nginx binary (apt-get install nginx; scripts/test installs it)"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(MAIN_CONF, root / "nginx.conf")
    conf_d = root / "conf.d"
    render(conf_d, env)
    leftover = [str(p) for p in conf_d.rglob("*.conf") if "${SPARSEGPT_" in p.read_text()]
    assert not leftover, f"variables the proxy service does not set in docker-compose.yml: {leftover}"
    if env["SPARSEGPT_TLS"] == "on":
        make_certificate(root / "certs")
    temp = root / "temp"
    temp.mkdir(exist_ok=True)
    paths = "".join(
        f"{kind}_temp_path {temp / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (conf_d / "test-paths.conf").write_text(paths)
    main = f"daemon off; pid {root / 'nginx.pid'};"
    if os.geteuid() == 0:  # else the workers would run as nobody, who cannot enter the test's temp dir
        main += f" user {pwd.getpwuid(os.geteuid()).pw_name};"
    return [NGINX, "-p", str(root), "-c", str(root / "nginx.conf"), "-e", "stderr", "-g", main]


def start_proxy(root: Path, upstream: str, *, tls: bool = False, **overrides: str) -> Proxy:
    """nginx on free ports in front of ``upstream`` (http://127.0.0.1:PORT), configured from
    deploy/nginx with docker-compose.yml's values and ``overrides`` (SPARSEGPT_* names)."""
    env = compose_proxy_env()
    env.update(
        SPARSEGPT_HTTP_PORT=str(free_port()),
        SPARSEGPT_HTTPS_PORT=str(free_port()),
        SPARSEGPT_UPSTREAM=upstream,
        SPARSEGPT_TLS="on" if tls else "off",
    )
    env.update(overrides)
    cmd = prepare(root, env)
    with (root / "access.log").open("wb") as out, (root / "error.log").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
    proxy = Proxy(root, env, proc)
    ports = [proxy.http_port] + ([proxy.https_port] if tls else [])
    deadline = time.monotonic() + 15
    while ports:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{proxy.error_log()}")
        try:
            socket.create_connection(("127.0.0.1", ports[0]), timeout=1).close()
            ports.pop(0)
        except OSError:
            if time.monotonic() > deadline:
                proxy.stop()
                raise RuntimeError(f"nginx not listening on {ports}:\n{proxy.error_log()}") from None
            time.sleep(0.05)
    return proxy
