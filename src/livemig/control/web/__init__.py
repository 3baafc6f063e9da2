"""The LMO's web dashboard: the region, each migration and each evacuation, live, in a browser.

``dashboard_router(store)`` is mounted by the LMO's app; ``allow_anyone`` is the dependency every
page passes, the place where authentication goes.
"""

from livemig.control.web.router import allow_anyone, dashboard_router

__all__ = ["allow_anyone", "dashboard_router"]
