"""CSRF tokens on the dashboard's forms (the second layer, behind the edge's Origin check): a
browser's POST to a form route without the form's token for this session (or, not signed in,
for this browser's csrf cookie) answers 403 and changes nothing, even from this very origin;
API clients with a Bearer token are unaffected. Real server processes over real HTTP; the
cross-site cases in Chromium, from a page served by another port of the same host (same site,
so SameSite=Lax cookies go along: only the token stops them)."""

from __future__ import annotations

import httpx
import pytest

from tests.support.web_server import auto_submit, find_token, form_token, other_site, web_server

REFUSED = "Reload the form"


@pytest.fixture(scope="module")
def server(module_redis, tmp_path_factory):
    with web_server(tmp_path_factory.mktemp("csrf"), module_redis.url, users=("alice", "bob", "mallory")) as s:
        yield s


def _any_token(html: str) -> str:
    """A page's form token, or a made-up one where the page has none (the code before tokens)."""
    return find_token(html) or "f" * 64


def _post(client: httpx.Client, path: str, token: str | None, **kwargs) -> httpx.Response:
    data = dict(kwargs.pop("data", {}))
    if token is not None:
        data["csrf_token"] = token
    return client.post(path, data=data, **kwargs)


def test_every_state_changing_form_carries_a_token(server):
    job_id = server.queued_job("alice")
    with server.browser() as browser:
        login = browser.get("/login")
        assert 'name="csrf_token"' in login.text and "sparsegpt_csrf" in login.headers["set-cookie"]
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie
        server.sign_in(browser, "alice")
        job = browser.get(f"/jobs/{job_id}").text
        assert 'id="cancel-job"' in job and 'id="logout-form"' in job
        assert job.count('name="csrf_token"') == 2  # cancel and log out
        new = browser.get("/jobs/new").text
        assert 'id="job-form"' in new and new.count('name="csrf_token"') == 2  # the job form and log out


@pytest.mark.parametrize("action", ["cancel", "retry", "new", "logout"])
def test_a_same_origin_post_without_the_right_token_is_refused(server, action, tmp_path):
    """From the dashboard's own origin (the edge lets it through), signed in, the session cookie
    sent: without the token, with a made-up one or with another session's, nothing happens."""
    job_id = server.queued_job("alice")
    path = {
        "cancel": f"/jobs/{job_id}/cancel",
        "retry": f"/jobs/{job_id}/retry",
        "new": "/jobs/new",
        "logout": "/logout",
    }[action]
    jobs_before = server.job_count()
    with server.browser() as browser, server.browser() as other:
        cookie = server.sign_in(browser, "alice")
        server.sign_in(other, "bob")
        others = _any_token(other.get("/").text)
        form = {"model": "org/name", "sparsity": "2:4", "method": "wanda", "calibration_source": "file"}
        files = {"calibration_file": ("calib.txt", b"some calibration text\n" * 100, "text/plain")}
        for token in (None, "", "0" * 64, others):
            extra = {"files": files, "data": form} if action == "new" else {}
            response = _post(browser, path, token, **extra)
            assert response.status_code == 403, (token, response.status_code, response.text[-500:])
            assert REFUSED in response.text and "text/html" in response.headers["content-type"]
        assert server.job_status(job_id) == "queued" and server.job_count() == jobs_before
        assert not list((server.data / "uploads").glob("**/*.*"))  # the file was not kept
        assert httpx.get(f"{server.base}/api/v1/me", cookies={"sparsegpt_session": cookie}).status_code == 200

        # The page's own token does it.
        token = form_token(browser.get(f"/jobs/{job_id}").text)
        if action == "cancel":
            done = _post(browser, path, token)
            assert done.status_code == 303 and server.job_status(job_id) == "cancelled"
        elif action == "retry":  # a retry needs an ended job: the refusal (409) shows the token passed
            assert _post(browser, path, token).status_code == 409
        elif action == "new":
            bad = dict(form, nsamples="0", calibration_source="c4")
            shown = _post(browser, path, token, data=bad, files=files)
            assert shown.status_code == 422 and 'id="error-nsamples"' in shown.text  # the form, checked
        else:
            assert _post(browser, path, token).status_code == 303
            assert httpx.get(f"{server.base}/api/v1/me", cookies={"sparsegpt_session": cookie}).status_code == 401


def test_a_token_dies_with_its_session(server):
    with server.browser() as browser:
        server.sign_in(browser, "alice")
        old = _any_token(browser.get("/").text)
        assert _post(browser, "/logout", old).status_code == 303
        server.sign_in(browser, "alice")
        job_id = server.queued_job("alice")
        assert _post(browser, f"/jobs/{job_id}/cancel", old).status_code == 403
        assert server.job_status(job_id) == "queued"


def test_sign_in_needs_the_forms_token_and_this_browsers_cookie(server):
    """Login CSRF: a token the attacker fetched for itself is worth nothing in another browser."""
    with server.browser() as attacker:
        attackers = _any_token(attacker.get("/login").text)
    with server.browser() as victim:
        for token in (None, attackers):
            response = _post(victim, "/login", token, data={"token": server.tokens["mallory"], "next": "/"})
            assert response.status_code == 403 and "sparsegpt_session" not in response.cookies
        victim.get("/login")  # this browser's cookie, but still the attacker's token
        response = _post(victim, "/login", attackers, data={"token": server.tokens["mallory"], "next": "/"})
        assert response.status_code == 403 and "sparsegpt_session" not in victim.cookies


def test_bearer_clients_and_scripts_need_no_token(server):
    """A Bearer token is no ambient credential a page could borrow: the API and the form routes
    take it as before; so do scripts that send no browser headers."""
    bearer = {"Authorization": f"Bearer {server.tokens['alice']}"}
    first, second = server.queued_job("alice"), server.queued_job("alice")
    assert httpx.post(f"{server.base}/api/v1/jobs/{first}/cancel", headers=bearer).status_code == 200
    assert httpx.post(f"{server.base}/jobs/{second}/cancel", headers=bearer).status_code == 303
    assert server.job_status(first) == server.job_status(second) == "cancelled"


def test_single_user_mode_forms_need_the_token_too(module_redis, tmp_path):
    """No sign-in on loopback: the browser itself is the credential, so its POSTs need a token."""
    with web_server(tmp_path, module_redis.url, auth="off", users=("alice",)) as single:
        job_id = single.queued_job("alice")
        with single.browser() as browser:
            refused = browser.post(f"/jobs/{job_id}/cancel")
            assert refused.status_code == 403 and REFUSED in refused.text
            assert single.job_status(job_id) == "queued"
            token = form_token(browser.get(f"/jobs/{job_id}").text)  # sets this browser's csrf cookie
            assert "sparsegpt_csrf" in browser.cookies
            assert browser.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token}).status_code == 303
        assert single.job_status(job_id) == "cancelled"


# --- in a browser, from another site ---------------------------------------------------------------


def _signed_in_context(browser, server, name: str):
    context = browser.new_context()
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.goto(f"{server.base}/login")
    page.fill("#token", server.tokens[name])
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.base}/")
    return context, page


def _forged(page, server, html: str):
    """Opens the attacker's page; returns the server's answer to the form it posts."""
    with other_site(html) as url:
        with page.expect_response(lambda r: r.url.startswith(server.base) and r.request.method == "POST") as answer:
            page.goto(url)
    return answer.value


def test_a_cross_site_auto_submitting_form_changes_nothing(browser, server):
    job_id = server.queued_job("alice")
    jobs_before = server.job_count()
    context, page = _signed_in_context(browser, server, "alice")
    try:
        form = {"model": "org/name", "sparsity": "2:4", "method": "wanda", "calibration_source": "c4"}
        for action, fields, enctype in (
            (f"/jobs/{job_id}/cancel", {}, "application/x-www-form-urlencoded"),
            (f"/jobs/{job_id}/retry", {}, "application/x-www-form-urlencoded"),
            ("/jobs/new", form, "multipart/form-data"),
            ("/logout", {}, "application/x-www-form-urlencoded"),
        ):
            answer = _forged(page, server, auto_submit(server.base + action, fields, enctype=enctype))
            assert answer.status == 403, (action, answer.status)
        assert server.job_status(job_id) == "queued" and server.job_count() == jobs_before
        page.goto(f"{server.base}/")  # still signed in
        assert page.url == f"{server.base}/" and page.inner_text("#current-user").startswith("alice")
        # The dashboard's own cancel button still works.
        page.goto(f"{server.base}/jobs/{job_id}")
        page.click("#cancel-job")
        page.wait_for_url(f"{server.base}/jobs/{job_id}?message=*")
        assert server.job_status(job_id) == "cancelled"
        page.click("#logout")
        page.wait_for_url(f"{server.base}/login")
        assert not [c for c in context.cookies() if c["name"] == "sparsegpt_session"]
    finally:
        context.close()


def test_login_csrf_from_another_site_cannot_sign_the_victim_in(browser, server):
    with server.browser() as attacker:  # the attacker's own, valid form token (for its own cookie)
        token = _any_token(attacker.get("/login").text)
    context = browser.new_context()
    context.set_default_timeout(20_000)
    page = context.new_page()
    try:
        page.goto(f"{server.base}/login")  # the victim has this server's csrf cookie already
        html = auto_submit(
            f"{server.base}/login", {"token": server.tokens["mallory"], "next": "/", "csrf_token": token}
        )
        assert _forged(page, server, html).status == 403
        assert not [c for c in context.cookies() if c["name"] == "sparsegpt_session"]
        page.goto(f"{server.base}/")
        assert page.url.startswith(f"{server.base}/login")
    finally:
        context.close()
