"""Start the team's MLflow tracking server from environment variables (the container's entrypoint).

PostgreSQL backend store, artifacts proxied by the server (``--serve-artifacts``) to
``MLFLOW_ARTIFACTS_DESTINATION`` (``s3://<bucket>`` on MinIO, or a directory), basic authentication
(``--app-name basic-auth``) with its user database on the same PostgreSQL. Every credential comes from
the environment (docker-compose fills it from ``.env``); the auth config file MLflow needs is written
here, mode 0600, into a private temporary directory, and no secret appears on the command line.

Environment (defaults in brackets):
    MLFLOW_DB_HOST [postgres], MLFLOW_DB_PORT [5432], MLFLOW_DB_USER [mlflow], MLFLOW_DB_PASSWORD [''],
    MLFLOW_DB_NAME [mlflow], MLFLOW_AUTH_DB_NAME [mlflow_auth]: the PostgreSQL databases.
    MLFLOW_ARTIFACTS_DESTINATION (required): where the server stores artifacts.
    MLFLOW_AUTH_ADMIN_USERNAME [admin], MLFLOW_AUTH_ADMIN_PASSWORD (required): the first admin user,
        created on the first start (read by MLflow itself).
    MLFLOW_AUTH_DEFAULT_PERMISSION [READ]: what a user may do with experiments others created.
    MLFLOW_HOST [0.0.0.0], MLFLOW_PORT [5000], MLFLOW_WORKERS [2]; MLFLOW_SERVER_ALLOWED_HOSTS (MLflow's
        Host-header allow-list, comma-separated; default: localhost and private IP addresses).

Exits with status 1 and a one-line ``error:`` when a required variable is missing or still has its
``change-me`` example value.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REQUIRED = ("MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_AUTH_ADMIN_PASSWORD")
#: Settings docker-compose passes as empty strings when .env leaves them empty; MLflow and boto3 must see
#: them unset (an empty S3 endpoint or Host allow-list is not "the default").
OPTIONAL = ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def database_url(name: str) -> str:
    """SQLAlchemy URL of database ``name`` on the configured PostgreSQL (user and password quoted)."""
    from sqlalchemy.engine import URL

    env = os.environ
    url = URL.create("postgresql+psycopg2", username=env.get("MLFLOW_DB_USER", "mlflow"),
                     password=env.get("MLFLOW_DB_PASSWORD") or None, host=env.get("MLFLOW_DB_HOST", "postgres"),
                     port=int(env.get("MLFLOW_DB_PORT", "5432")), database=name)
    return url.render_as_string(hide_password=False)


def auth_config(directory: Path) -> Path:
    """Write MLflow's basic-auth config (``[mlflow]`` section) into ``directory``; return its path.

    ``%`` is doubled because MLflow reads the file with ``configparser`` interpolation.
    """
    env = os.environ
    text = "\n".join([
        "[mlflow]",
        f"default_permission = {env.get('MLFLOW_AUTH_DEFAULT_PERMISSION', 'READ')}",
        f"database_uri = {database_url(env.get('MLFLOW_AUTH_DB_NAME', 'mlflow_auth')).replace('%', '%%')}",
        f"admin_username = {env.get('MLFLOW_AUTH_ADMIN_USERNAME', 'admin')}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "",
    ])
    path = directory / "basic_auth.ini"
    path.touch(mode=0o600)
    path.write_text(text)
    return path


def main() -> None:
    env = os.environ
    for name in OPTIONAL:
        if env.get(name) == "":
            del env[name]
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not set (see .env.example)")
    examples = [name for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_DB_PASSWORD")
                if env.get(name, "").startswith("change-me")]
    if examples:
        sys.exit(f"error: {', '.join(examples)} still has the example value from .env.example")
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(Path(tempfile.mkdtemp(prefix="mlflow-auth-"))))
    env["MLFLOW_BACKEND_STORE_URI"] = database_url(env.get("MLFLOW_DB_NAME", "mlflow"))
    env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", os.urandom(24).hex())
    args = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--serve-artifacts",
            "--artifacts-destination", env["MLFLOW_ARTIFACTS_DESTINATION"],
            "--host", env.get("MLFLOW_HOST", "0.0.0.0"), "--port", env.get("MLFLOW_PORT", "5000"),
            "--workers", env.get("MLFLOW_WORKERS", "2")]
    os.execv(sys.executable, args)


if __name__ == "__main__":
    main()
