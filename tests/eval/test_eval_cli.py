"""`medmllm eval` and `medmllm eval compare` through typer (on the sub-app and attached to a parent app)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from medmllm.eval.cli import eval_app

runner = CliRunner()


@pytest.fixture(scope="module")
def parent_app():
    """The sub-app attached the way medmllm.cli will attach it."""
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")

    @app.command("other")
    def other() -> None:  # a second command makes `eval` a real sub-group
        pass

    return app


@pytest.fixture(scope="module")
def endpoint():
    """An OpenAI-compatible server on loopback answering 'yes' to everything; yields (url, request count)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            data = json.dumps({"model": "srv", "choices": [{"message": {"content": "yes"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    httpd.shutdown()
    httpd.server_close()


def test_eval_in_process_then_compare_through_the_parent_app(env, parent_app, endpoint, tmp_path):
    data, model_dir, task = env
    common = ["--task", str(task), "--data-root", str(data), "--limit", "2", "--no-progress"]
    r = runner.invoke(parent_app, ["eval", "--model", str(model_dir), "--batch-size", "2", "--out",
                                   str(tmp_path / "a")] + common)
    assert r.exit_code == 0, r.output
    assert "phantom_xray_train (n=2): exact" in r.output and "drop (blank)" in r.output
    res = json.loads((tmp_path / "a" / "phantom_xray_train" / "results.json").read_text())
    assert res["model"]["backend"] == "in-process" and res["blind"]["status"] == "done"
    assert (tmp_path / "a" / "report.md").exists() and "data:image/png;base64," in (tmp_path / "a" /
                                                                                   "report.html").read_text()
    url, seen = endpoint
    r = runner.invoke(parent_app, ["eval", "--endpoint", url, "--model", "served", "--api-key", "k", "--out",
                                   str(tmp_path / "b")] + common)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b" / "phantom_xray_train" / "results.json").read_text())
    assert len(seen) == 2 and seen[0]["model"] == "served" and seen[0]["max_tokens"] == 4
    assert res["model"]["served_model"] == "srv" and res["blind"]["status"] == "unsupported"
    r = runner.invoke(parent_app, ["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                                   str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "c" / "compare.md").read_text()
    assert "| task / protocol or metric | a | b |" in md


def test_protocol_override_on_the_sub_app(env, tmp_path):
    data, model_dir, task = env
    r = runner.invoke(eval_app, ["--model", str(model_dir), "--task", str(task), "--protocol", "f1", "--protocol",
                                 "exact", "--limit", "2", "--no-blind", "--data-root", str(data), "--no-progress",
                                 "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "phantom_xray_train" / "results.json").read_text())
    assert list(res["protocols"]) == ["exact", "f1"] and res["blind"] == {"status": "off"}


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task 'nope'; known: gmai_mmbench"),
    (["--task", "vqa_rad", "--protocol", "strict"], "unknown protocol 'strict'; known: exact"),
    (["--task", "medphantom_xray"], "medmllm phantoms --out"),
    (["--task", "vqa_rad"], "medmllm convert vqa_rad"),
])
def test_errors_name_the_known_values_or_the_command(env, tmp_path, args, message):
    r = runner.invoke(eval_app, ["--model", str(env[1]), "--data-root", str(tmp_path), "--out",
                                 str(tmp_path / "o")] + args)
    assert r.exit_code == 2 and message in r.output, r.output


def test_usage_errors(tmp_path, parent_app):
    r = runner.invoke(eval_app, ["--model", str(tmp_path), "--task", "vqa_rad", "--out", str(tmp_path / "o"),
                                 "--data-root", str(tmp_path)])
    assert r.exit_code == 2 and "expected a model folder" in r.output
    r = runner.invoke(eval_app, ["--task", "vqa_rad"])
    assert r.exit_code == 2 and "missing --model, --out" in r.output
    r = runner.invoke(parent_app, ["eval", "compare", str(tmp_path), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "holds no results" in r.output
    r = runner.invoke(parent_app, ["eval"])
    assert r.exit_code == 0 and "--model" in r.output and "compare" in r.output  # help
    r = runner.invoke(eval_app, ["--list"])
    assert r.exit_code == 0 and "vqa_rad" in r.output and "llava-med" in r.output
