"""The few HTML pages the app shows: in the portal frame, after OAuth, and on errors."""

import time
from html import escape

from schemas import Health, PortalStatus, RobotRun, StatusReport

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2rem;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}"
    ".bad{color:#b00}.ok{color:#070}"
)


def _page(title: str, body: str, head: str = "") -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style>{head}</head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )


def install_finish_page(domain: str, robot: str = "registered") -> str:
    """Tells the portal the install is complete; must run inside the portal's frame."""
    head = (
        '<script src="//api.bitrix24.com/api/v1/"></script>'
        "<script>BX24.init(function(){BX24.installFinish();});</script>"
    )
    state = (
        "is registered"
        if robot == "registered"
        else "is being registered: the portal did not answer in time, the app keeps trying"
    )
    body = f'<p class="ok">Installed on {escape(domain)}. The robot "Create contact" {state}.</p>'
    return _page("Bitrix24 robot installed", body, head)


def message_page(title: str, message: str, ok: bool = True) -> str:
    css = "ok" if ok else "bad"
    return _page(title, f'<p class="{css}">{escape(message)}</p>')


def status_page(report: StatusReport) -> str:
    """The app's status: settings and queue for anyone; portals and runs for the portal's users."""
    health = report.health
    parts = [_settings_section(health), _connection_section(health), _queue_section(health)]
    if report.verified:
        parts += [_portals_section(report.portals), _runs_section(report.runs)]
    else:
        parts.append("<p>Open the app from your Bitrix24 portal to see its portals and last robot runs.</p>")
    return _page("Bitrix24 contact robot", "".join(parts))


def _connection_section(health: Health) -> str:
    if not health.portal_connected:
        return '<p class="bad">No portal connected yet: install the app in the portal.</p>'
    robot = "registered" if health.robot_registered else "not registered: install the app again"
    return f'<p class="ok">A portal is connected; the robot is {robot}.</p>'


def _settings_section(health: Health) -> str:
    notes = []
    if health.missing_settings:
        names = ", ".join(health.missing_settings)
        notes.append(f'<p class="bad">Missing settings: {escape(names)}. Set them in .env and restart.</p>')
    if health.token_store_error:
        notes.append(f'<p class="bad">{escape(health.token_store_error)}</p>')
    return "".join(notes) or '<p class="ok">Settings complete.</p>'


def _portals_section(portals: list[PortalStatus]) -> str:
    if not portals:
        return ""
    rows = "".join(
        f"<tr><td>{escape(p.domain)}</td><td>{escape(p.member_id)}</td>"
        f"<td>{'yes' if p.connected else 'no: ' + escape(p.disconnected_reason or '')}</td>"
        f"<td>{p.token_valid_for_seconds}s</td>"
        f"<td>{'yes' if p.robot_registered else escape(p.robot_problem or 'no')}</td></tr>"
        for p in portals
    )
    head = "<tr><th>Portal</th><th>member_id</th><th>Connected</th><th>Token valid</th><th>Robot</th></tr>"
    return f"<h2>Portals</h2><table>{head}{rows}</table>"


def _queue_section(health: Health) -> str:
    q = health.queue
    age = "-" if q.oldest_pending_age_seconds is None else f"{q.oldest_pending_age_seconds:.0f}s"
    return (
        f"<h2>Queue</h2><p>Pending: {q.pending} (oldest {age}); done: {q.done}; "
        f"failed: {q.failed}; abandoned: {q.abandoned}</p>"
    )


def _runs_section(runs: list[RobotRun]) -> str:
    if not runs:
        return "<h2>Last robot runs</h2><p>None yet.</p>"
    rows = "".join(
        f"<tr><td>{r.job_id}</td><td>{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.created_at))}</td>"
        f"<td>{escape(r.workflow_id)}</td><td>{escape(r.state)}</td><td>{r.contact_id}</td>"
        f"<td>{escape(r.error)}</td></tr>"
        for r in runs
    )
    head = (
        "<tr><th>Job</th><th>Accepted</th><th>Workflow</th><th>State</th><th>Contact</th><th>Error</th></tr>"
    )
    return f"<h2>Last robot runs</h2><table>{head}{rows}</table>"
