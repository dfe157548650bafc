"""A real browser's view of built pages: headless Chromium loads each page from a local HTTP server inside an
iframe of a probe page, waits for MathJax, and reports whether math rendered, every image loaded, and any
traceback is on the page."""

import functools
import http.server
import json
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

PROBE = """<!doctype html><html><body><pre id="out">pending</pre>
<iframe id="page" src="{page}" style="width:1200px;height:900px"></iframe>
<script>
const frame = document.getElementById("page");
frame.addEventListener("load", () => setTimeout(() => {{
  const doc = frame.contentDocument;
  const images = Array.from(doc.images);
  const text = doc.body.innerText;
  const folded = doc.querySelector("details.hide");
  let opens = null;
  if (folded) {{
    const code = folded.querySelector(".cell_input, pre");
    const before = folded.open;
    folded.querySelector("summary").click();
    opens = !before && folded.open && code !== null && code.getClientRects().length > 0;
  }}
  const csv = Array.from(doc.querySelectorAll("a.download")).map(a => a.href).filter(h => h.endsWith(".csv"));
  const links = csv.map(h => {{
    const r = new XMLHttpRequest(); r.open("GET", h, false); r.send();
    return {{href: h, status: r.status, header: r.status === 200 ? r.responseText.split("\\n")[0] : ""}};
  }});
  const anchors = Array.from(doc.querySelectorAll("a")).map(a => ({{text: a.textContent, href: a.href}}));
  document.getElementById("out").textContent = "RESULT" + JSON.stringify({{
    math: doc.querySelectorAll("mjx-container").length,
    images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src")),
    traceback: /Traceback \\(most recent call last\\)|Error: |Exception: /.test(text),
    title: doc.title,
    provenance: (doc.body.textContent.match(/About this page[\\s\\S]*?from commit ([0-9a-f]{{7,}}|unknown)/) || [null, null])[1],
    folded: doc.querySelectorAll("details.hide").length,
    opens: opens,
    csv: links,
    launch: anchors.filter(a => /Binder|Colab|source notebook/.test(a.text)).map(a => a.href),
  }}) + "END";
}}, 4000));
</script></body></html>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def inspect(html_root: Path, pages: list[str]) -> dict[str, dict]:
    """page (relative path) -> {math, images, broken, traceback, title, provenance (the commit its box names),
    folded (hidden code cells), opens (whether the first one opened when clicked), csv (each data link: href,
    HTTP status, header line), launch (the launch links' targets)}, as Chromium saw it."""
    html_root = Path(html_root)
    handler = functools.partial(_QuietHandler, directory=str(html_root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = {}
    try:
        for page in pages:
            probe = html_root / f"_probe_{Path(page).stem}.html"
            probe.write_text(PROBE.format(page="/" + page))
            with tempfile.TemporaryDirectory() as profile:
                cmd = [
                    chromium(),
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    f"--user-data-dir={profile}",
                    "--virtual-time-budget=20000",
                    "--dump-dom",
                    f"http://127.0.0.1:{server.server_port}/{probe.name}",
                ]
                dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
            probe.unlink()
            start, end = dom.find("RESULT"), dom.find("END", dom.find("RESULT"))
            out[page] = json.loads(dom[start + 6 : end].replace("&quot;", '"')) if start >= 0 else {"error": dom[-500:]}
    finally:
        server.shutdown()
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
