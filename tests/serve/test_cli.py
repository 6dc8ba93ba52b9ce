"""serve/cli.py through typer's CliRunner: `serve` wiring (keys from options and the environment,
limits, the default-model message), `chat` (streamed answers, history, /image, /reset, /quit) and
stream_answer."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from medmllm.serve import cli

runner = CliRunner()


def test_api_keys_merge_options_and_environment():
    assert cli.api_keys(["k1", "k2"], env="k2, k3  k4") == ["k1", "k2", "k3", "k4"]
    assert cli.api_keys(None, env="") == []


def test_serve_builds_the_app_and_runs_uvicorn(model_dir, monkeypatch):
    import uvicorn

    from medmllm.serve.middleware import ApiKeyAuth, BodyLimit

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    access = logging.getLogger("medmllm.serve.access")       # serve points it at the runner's stderr, closed
    for attr in ("handlers", "propagate", "level"):           # afterwards: restored for later tests' servers
        monkeypatch.setattr(access, attr, getattr(access, attr))
    monkeypatch.setenv(cli.KEYS_ENV, "k2,k3")
    result = runner.invoke(cli.app, ["serve", "--model", str(model_dir), "--api-key", "k1", "--port", "8123",
                                     "--max-body-mb", "2", "--cors-origin", "http://localhost:3000",
                                     "--model-id", "my-model", "--prepare-concurrency", "3"])
    assert result.exit_code == 0, result.output
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    mw = {m.cls: m.kwargs for m in seen["app"].user_middleware}
    assert mw[ApiKeyAuth]["keys"] == ["k1", "k2", "k3"]
    assert mw[BodyLimit]["max_bytes"] == 2 << 20
    assert any(m.cls.__name__ == "CORSMiddleware" for m in seen["app"].user_middleware)
    assert seen["app"].state.engine.model_id == "my-model"
    assert seen["app"].state.engine.decode_process           # by default where it can; started with the app
    assert seen["app"].state.engine.prepare_concurrency == 3
    seen["app"].state.engine.close()
    result = runner.invoke(cli.app, ["serve", "--model", str(model_dir), "--no-decode-process"])
    assert result.exit_code == 0, result.output
    assert not seen["app"].state.engine.decode_process


def test_without_a_model_the_message_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("serve", "chat"):
        result = runner.invoke(cli.app, [command])
        assert result.exit_code == 2
        assert "medmllm quickstart" in result.output and "--model" in result.output


def test_default_model_is_the_quickstarts(tmp_path, monkeypatch, model_dir):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / cli.DEFAULT_MODEL
    target.parent.mkdir(parents=True)
    target.symlink_to(model_dir, target_is_directory=True)
    assert cli.resolve_model(None) == cli.DEFAULT_MODEL


def test_chat_streams_answers_keeps_history_and_handles_commands(model_dir, tmp_path, xray_png):
    from medmllm.serve.engine import Engine, SamplingParams

    png = tmp_path / "x.png"
    png.write_bytes(xray_png)
    script = "What is shown?\n/image missing.png\n/bogus\nAnd now?\n/reset\n/quit\nnever asked\n"
    result = runner.invoke(cli.app, ["chat", "--model", str(model_dir), "--image", str(png),
                                     "--max-new-tokens", "6"], input=script)
    assert result.exit_code == 0, result.output
    # the reference answers, computed by an engine on the same model (default shapes, as chat uses)
    eng = Engine.from_pretrained(model_dir).start()
    try:
        first_msg = {"role": "user", "content": [{"type": "image", "path": str(png.resolve())},
                                                 {"type": "text", "text": "What is shown?"}]}
        first = eng.complete([first_msg], SamplingParams(max_tokens=6)).text
        second = eng.complete([first_msg, {"role": "assistant", "content": [{"type": "text", "text": first}]},
                               {"role": "user", "content": [{"type": "text", "text": "And now?"}]}],
                              SamplingParams(max_tokens=6)).text
        streamed = cli.stream_answer(eng, [{"type": "image", "path": str(png)}], "What is shown?", max_new_tokens=6,
                                     write=lambda t: None)
    finally:
        eng.close()
    out = result.output
    assert f"model> {first}\n" in out
    assert f"model> {second}\n" in out                      # the second turn saw the first
    assert "no such file: missing.png" in out and "unknown command '/bogus'" in out
    assert "(conversation cleared)" in out and "never asked" not in out.split("/quit")[-1]
    assert out.count("model> ") == 2
    assert streamed == first


def test_chat_reports_an_unreadable_file_and_goes_on(model_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    result = runner.invoke(cli.app, ["chat", "--model", str(model_dir), "--max-new-tokens", "3"],
                           input=f"/image {bad}\nWhat?\nhi\n")
    assert result.exit_code == 0, result.output
    assert "could not be read" in result.output and "attached files were dropped" in result.output
    assert result.output.count("model> ") == 2
    assert result.output.count("error:") == 1          # the next question is answered without the bad file


@pytest.mark.parametrize("flag", ["--image", "--ehr"])
def test_chat_refuses_missing_files(model_dir, flag):
    result = runner.invoke(cli.app, ["chat", "--model", str(model_dir), flag, "nope.file"], input="/quit\n")
    assert result.exit_code == 2 and "not found" in result.output
