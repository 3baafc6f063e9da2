"""``livemig pki ...`` (the region CA and its certificates) and ``livemig token ...`` (users' bearer tokens)."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from livemig.region.local import default_state_dir
from livemig.security import pki

pki_app = typer.Typer(no_args_is_help=True, help="The region CA: certificates per service and host.")
token_app = typer.Typer(no_args_is_help=True, help="Users' bearer tokens (roles viewer, operator, admin).")
out = Console()
err = Console(stderr=True)

PkiDir = Annotated[Path | None, typer.Option("--dir", help="the PKI directory (default: STATE_DIR/pki)")]
StateDir = Annotated[Path | None, typer.Option("--state-dir", help="region state (default $LIVEMIG_STATE)")]
RoleOpt = Annotated[str, typer.Option("--role", help="lmo | hostd | blockd | vswitch | qemu")]
Sans = Annotated[list[str] | None, typer.Option("--san", help="a host name or address it is reached on (repeat)")]


def _dir(directory: Path | None, state_dir: Path | None) -> Path:
    return directory or (state_dir or default_state_dir()) / "pki"


@pki_app.command("init")
def pki_init(
    region: Annotated[str, typer.Option(help="the region's name (lower case)")] = "local",
    directory: PkiDir = None,
    state_dir: StateDir = None,
) -> None:
    """Create the region CA (its key stays in this directory, 0600: keep it off the hosts)."""
    where = _dir(directory, state_dir)
    ca = pki.init_ca(where, region)
    out.print(f"region {ca.region} CA: {ca.cert} (key {ca.key})")


@pki_app.command("issue")
def pki_issue(
    name: Annotated[str, typer.Argument(help="the service or host name (a host's name, lower case)")],
    role: RoleOpt,
    san: Sans = None,
    days: Annotated[int, typer.Option(help="validity")] = pki.LEAF_DAYS,
    qemu_dir: Annotated[Path | None, typer.Option(help="also write QEMU's tls-creds-x509 layout here")] = None,
    directory: PkiDir = None,
    state_dir: StateDir = None,
) -> None:
    """Issue NAME's certificate for ROLE, naming every address it is reached on (API, migration, storage)."""
    where = _dir(directory, state_dir)
    leaf = pki.issue(where, name, role, [name, *(san or [])], days=days)
    out.print(
        f"{leaf.identity}: {leaf.cert} (key {leaf.key}), names {', '.join(pki.sans_of(pki.load_cert(leaf.cert)))}"
    )
    if qemu_dir is not None:
        out.print(f"QEMU layout: {pki.qemu_tls_dir(where, name, qemu_dir, role=role)}")


@pki_app.command("rotate")
def pki_rotate(
    name: str,
    role: RoleOpt,
    san: Sans = None,
    days: Annotated[int, typer.Option(help="validity")] = pki.LEAF_DAYS,
    directory: PkiDir = None,
    state_dir: StateDir = None,
) -> None:
    """Re-issue NAME's certificate in place (new key); running services and VMs pick it up, no restart."""
    where = _dir(directory, state_dir)
    leaf = pki.rotate(where, name, role, san or None, days=days)
    cert = pki.load_cert(leaf.cert)
    out.print(f"{leaf.identity}: rotated, valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; no restart: "
              "servers serve it from their next handshake, clients present it on their next connection, QEMU "
              "from its next migration")  # fmt: skip


@pki_app.command("list")
def pki_list(
    directory: PkiDir = None,
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every certificate of the region with its identity, names and expiry."""
    where = _dir(directory, state_dir)
    rows = []
    for cert_path in sorted(where.glob(f"*/*/{pki.LEAF_CERT}")):
        cert = pki.load_cert(cert_path)
        identity = pki.identity_of(cert)
        until = cert.not_valid_after_utc
        rows.append({"identity": identity.uri, "names": pki.sans_of(cert), "not_after": until,
                     "expired": until < dt.datetime.now(dt.UTC), "cert": str(cert_path)})  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    table = Table(title=f"certificates in {where}")
    for column in ("identity", "names", "valid until"):
        table.add_column(column, overflow="fold")
    for row in rows:
        shown = f"{row['not_after']:%Y-%m-%d}" + (" [red]EXPIRED[/]" if row["expired"] else "")
        table.add_row(str(row["identity"]), ", ".join(row["names"]), shown)  # type: ignore[arg-type]
    out.print(table)


@pki_app.command("verify")
def pki_verify(cert: Path, directory: PkiDir = None, state_dir: StateDir = None) -> None:
    """Check CERT the way a peer would (chain to the region CA, validity) and print its identity."""
    identity = pki.verify(_dir(directory, state_dir) / pki.CA_CERT, cert)
    out.print(f"{cert}: valid, {identity}")


# ---------------------------------------------------------------------- tokens

Db = Annotated[str | None, typer.Option("--db", help="work on the LMO's store directly (the first admin "
                                        "token, on the LMO's machine); default: through the LMO's API")]  # fmt: skip
Url = Annotated[str | None, typer.Option("--url", help="LMO URL (default: the config file's)")]


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="who or what holds it")],
    role: Annotated[str, typer.Option(help="viewer | operator | admin")] = "viewer",
    db: Db = None,
    url: Url = None,
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a bearer token (shown this once; the LMO keeps only its hash)."""
    if db is not None:
        from livemig.control import tokens
        from livemig.control.store import Store

        record, token = tokens.issue(Store(db), name, role)
        token_id, token_role = record.id, record.role
    else:
        from livemig.cli.client import lmo
        from livemig.wire import lmo as wire_lmo

        with lmo(url, state_dir) as client:
            created = client.run(wire_lmo.create_token(name, role))
        token_id, token_role, token = created.id, created.role, created.token
    if as_json:
        sys.stdout.write(json.dumps({"id": token_id, "name": name, "role": token_role, "token": token}) + "\n")
        return
    err.print(f"token {token_id} for {name} ({token_role}); it is shown once:")
    sys.stdout.write(token + "\n")


@token_app.command("list")
def token_list(
    db: Db = None,
    url: Url = None,
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every token: id, holder, role, when made and revoked (never the tokens themselves)."""
    rows: list[dict[str, object]]
    if db is not None:
        from livemig.control.store import Store

        rows = [{"id": r.id, "name": r.name, "role": r.role, "created_at": r.created_at, "revoked_at": r.revoked_at}
                for r in Store(db).tokens()]  # fmt: skip
    else:
        from livemig.cli.client import lmo
        from livemig.wire import lmo as wire_lmo

        with lmo(url, state_dir) as client:
            rows = [t.model_dump() for t in client.run(wire_lmo.tokens())]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    table = Table(title="tokens")
    for column in ("id", "name", "role", "created", "revoked"):
        table.add_column(column, no_wrap=column == "id")
    for row in rows:
        revoked = row["revoked_at"]
        table.add_row(str(row["id"]), str(row["name"]), str(row["role"]), f"{row['created_at']:%Y-%m-%d %H:%M}",
                      "-" if revoked is None else f"{revoked:%Y-%m-%d %H:%M}")  # fmt: skip
    out.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str, db: Db = None, url: Url = None, state_dir: StateDir = None) -> None:
    """Revoke a token: the LMO refuses it (401) from the next request on."""
    if db is not None:
        from livemig.control.store import Store

        Store(db).revoke_token(token_id)
    else:
        from livemig.cli.client import lmo
        from livemig.wire import lmo as wire_lmo

        with lmo(url, state_dir) as client:
            client.run(wire_lmo.revoke_token(token_id))
    out.print(f"token {token_id} revoked")
