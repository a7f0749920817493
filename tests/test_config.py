"""Options: defaults < TOML < environment < flags, and clear one-line errors with exit code 2."""
from __future__ import annotations

import argparse
import subprocess

import pytest

from swarmtrain.peer.config import CoordinatorOptions, PeerOptions, build_manifest
from swarmtrain.peer.options import OptionsError, add_options, build_options

from conftest import swarmtrain_cmd

PEER = "/ip4/127.0.0.1/tcp/4000/p2p/QmQHWGf68VeNfbs9asN4W48QYd1jcNEegPwdHfT6ZAi4kG"


def _parse(cls, argv, env=None):
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    return build_options(cls, parser.parse_args(argv), env or {})


def test_precedence_defaults_toml_env_flags(tmp_path):
    config = tmp_path / "peer.toml"
    config.write_text('max_experts = 3\npublic-name = "from-toml"\nmodalities = ["text"]\nthreads = 2\n')
    opts = _parse(PeerOptions, ["--config", str(config), "--threads", "4"], {"SWARMTRAIN_PUBLIC_NAME": "from-env"})
    assert (opts.max_experts, opts.public_name, opts.modalities, opts.threads) == (3, "from-env", ["text"], 4)
    assert opts.device == "auto"  # default
    opts = _parse(PeerOptions, ["--modalities", "text,image", "--no-use-relay"], {})
    assert opts.modalities == ["text", "image"] and opts.use_relay is False


def test_bad_values_name_the_option_and_source(tmp_path):
    with pytest.raises(OptionsError, match=r"--max-experts \(from environment variable SWARMTRAIN_MAX_EXPERTS\)"):
        _parse(PeerOptions, [], {"SWARMTRAIN_MAX_EXPERTS": "many"})
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_option = 1\n")
    with pytest.raises(OptionsError, match="unknown option 'no_such_option'"):
        _parse(PeerOptions, ["--config", str(bad)])
    broken = tmp_path / "broken.toml"
    broken.write_text("x = [\n")
    with pytest.raises(OptionsError, match="not valid TOML"):
        _parse(PeerOptions, ["--config", str(broken)])
    opts = _parse(PeerOptions, ["--initial-peers", "/ip4/1.2.3.4/tcp/5"])
    with pytest.raises(OptionsError, match="must end with /p2p/"):
        opts.check()


def test_manifest_table_is_validated():
    manifest = build_manifest({"model": {"hidden": 32, "heads": 4}}, "r", "Qm" + "1" * 44)
    assert manifest.model.hidden == 32
    with pytest.raises(OptionsError, match="model.hidden"):
        build_manifest({"model": {"hidden": "big"}}, "r", "Qm" + "1" * 44)
    with pytest.raises(OptionsError, match="must not set 'coordinator'"):
        build_manifest({"coordinator": "x"}, "r", "Qm" + "1" * 44)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", [
    (["peer"], "--initial-peers is required"),
    (["peer", "--initial-peers", "/ip4/nonsense"], "invalid multiaddr in --initial-peers: '/ip4/nonsense'"),
    (["peer", "--initial-peers", PEER, "--modalities", "smell"], "unknown modality 'smell'"),
    (["peer", "--initial-peers", PEER, "--data-shard", "3/2"], "bad --data-shard '3/2'"),
    (["coordinator", "--run-id", "no spaces"], "invalid run id"),
    (["demo", "--peers", "0"], "--peers must be between 1 and 32"),
])
def test_cli_rejects_bad_input_with_exit_code_2(args, message):
    result = subprocess.run(swarmtrain_cmd(*args), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one clear line, no traceback


def test_help_documents_every_option():
    result = subprocess.run(swarmtrain_cmd("peer", "--help"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ["--initial-peers", "--modalities", "--device", "--identity", "--public-name", "--max-experts",
                 "--data", "--host-maddrs", "--announce-maddrs", "--client-mode", "--use-auto-relay", "SWARMTRAIN_"]:
        assert flag in result.stdout


@pytest.mark.timeout(60)
def test_unknown_flag_is_one_line_exit_2():
    result = subprocess.run(swarmtrain_cmd("peer", "--no-such-flag"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
