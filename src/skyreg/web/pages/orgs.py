"""The console's start: the orgs the session's token sees, and each org's apps."""

from __future__ import annotations

from aiohttp import web

from skyreg.web.base import Page, View, page, paged, redirect

PAGES: list[Page] = []


@page(PAGES, "GET", "/")
async def home(view: View) -> web.StreamResponse:
    """Signed in: the orgs (one org: straight to it)."""
    orgs = (await view.api("listOrgs")).orgs
    if len(orgs) == 1:
        return redirect(f"/orgs/{orgs[0].name}")
    return redirect("/orgs")


@page(PAGES, "GET", "/orgs")
async def org_list(view: View) -> web.StreamResponse:
    orgs = (await view.api("listOrgs")).orgs
    listing = paged(view, orgs, lambda o: o.name)
    return view.render("orgs.html", title="Organizations", listing=listing)


@page(PAGES, "GET", "/orgs/{org}")
async def org_page(view: View) -> web.StreamResponse:
    org = view.param("org")
    apps = (await view.api("listApps", query={"org": org})).apps
    listing = paged(view, apps, lambda a: a.name)
    return view.render("org.html", title=org, org=org, listing=listing)
