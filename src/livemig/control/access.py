"""Who may call each route of the LMO (users by bearer token, services by certificate).

Users: ``viewer`` reads, ``operator`` changes, ``admin`` manages tokens (each includes the ones
before). A route the table does not name follows its method: reading (GET) takes a viewer,
anything else an operator, so a route added later is never open to an anonymous caller. The
exceptions are named below: a host registers itself (its own hostd certificate, nobody else's);
a VM's console is the guest's own output and input, so it takes an operator; tokens take an admin;
the health check is public (load balancers); the login form is public (it is how one logs in).
"""

from __future__ import annotations

from livemig.faults.api import FAULT_CHANGES, FAULT_READS
from livemig.security.access import PUBLIC, Access, Policy, services, users
from livemig.security.access import UserRole as U
from livemig.security.pki import Role

DASHBOARD = "/ui"

POLICY: Policy = {
    ("GET", "/healthz"): PUBLIC,
    ("PUT", "/hosts/{name}"): services(Role.HOSTD, own_host=True),
    ("GET", "/vms/{name}/console"): users(U.OPERATOR),
    ("POST", "/migrations/preflight"): users(U.VIEWER),  # asks, starts nothing
    ("POST", "/tokens"): users(U.ADMIN),
    ("GET", "/tokens"): users(U.ADMIN),
    ("DELETE", "/tokens/{token_id}"): users(U.ADMIN),
    ("GET", f"{DASHBOARD}/login"): PUBLIC,
    ("POST", f"{DASHBOARD}/login"): PUBLIC,
    ("POST", f"{DASHBOARD}/logout"): PUBLIC,
    # faults break things on purpose: arming and releasing them is an admin's; reading, a viewer's
    **{route: users(U.ADMIN) for route in FAULT_CHANGES},
    **{route: users(U.VIEWER) for route in FAULT_READS},
}

_READ, _CHANGE = users(U.VIEWER), users(U.OPERATOR)
_PAGES = users(U.VIEWER, pages=True)


def default_rule(method: str, path: str) -> Access:
    """The rule of a route the table does not name: GET reads (viewer), anything else changes
    (operator); the dashboard's pages, fragments and charts also take the login cookie."""
    if method == "GET":
        return _PAGES if path.startswith(DASHBOARD) else _READ
    return _CHANGE
