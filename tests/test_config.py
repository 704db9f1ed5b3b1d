"""Server configuration: flag > NETVLAD_* environment variable > default, and clear refusals."""

from __future__ import annotations

import dataclasses
import os

import pytest
from netvlad_server.config import (
    OFFICIAL_MODEL_NAME,
    SERVER_OPTIONS,
    ConfigError,
    Resize,
    ServerConfig,
    build_parser,
    default_model,
    parse_config,
)


def test_defaults_without_flags_or_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/ here
    config = parse_config([], {})
    assert config.model == "demo" and config.model_is_default
    assert (config.port, config.metrics_port, config.max_batch_size) == (50051, 9090, 8)
    assert config.max_queue_delay_ms == 5.0 and config.max_queue_size == 64
    assert config.max_image_pixels == 4096 * 4096 and config.min_image_side == 16
    assert config.resize == Resize() and config.precision == "auto" and not config.xla
    assert (config.intra_op_threads, config.inter_op_threads, config.gpu_memory_growth) == (
        0, 1, True)
    assert config.warmup_sizes == ((480, 640),)
    assert config.address == "0.0.0.0:50051"


def test_flag_beats_environment_which_beats_default():
    env = {"NETVLAD_PORT": "6000", "NETVLAD_MAX_BATCH_SIZE": "16", "NETVLAD_XLA": "true",
           "NETVLAD_RESIZE": "fit:640", "NETVLAD_WARMUP_SIZES": "240x320, 480x640",
           "NETVLAD_PRECISION": "BFLOAT16", "NETVLAD_MODEL": "/weights/model.npz"}
    config = parse_config(["--port", "7000", "--no-xla"], env)
    assert config.port == 7000  # flag
    assert not config.xla  # --no-xla overrides the environment
    assert config.max_batch_size == 16 and config.precision == "bfloat16"  # environment
    assert config.resize == Resize(640) and str(config.resize) == "fit:640"
    assert config.warmup_sizes == ((240, 320), (480, 640))
    assert config.model == "/weights/model.npz" and not config.model_is_default
    assert config.metrics_port == 9090  # default
    assert parse_config(["--warmup-sizes", ""], {}).warmup_sizes == ()


def test_the_official_directory_under_models_is_the_default(tmp_path, monkeypatch):
    (tmp_path / "models" / OFFICIAL_MODEL_NAME).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config = parse_config([], {})
    assert config.model == f"models/{OFFICIAL_MODEL_NAME}" and config.model_is_default
    assert default_model(tmp_path / "nothing") == "demo"


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--port", "70000"], {},
     "argument --port: expected an integer between 0 and 65535, got 70000"),
    ([], {"NETVLAD_MAX_BATCH_SIZE": "eight"},
     "environment variable NETVLAD_MAX_BATCH_SIZE='eight': expected an integer, got 'eight'"),
    (["--resize", "fit:-3"], {}, "expected 'keep' or 'fit:N'"),
    (["--warmup-sizes", "480by640"], {}, "expected HEIGHTxWIDTH"),
    (["--precision", "int4"], {}, "expected one of float32, bfloat16, float16, int8, auto"),
    ([], {"NETVLAD_XLA": "maybe"}, "environment variable NETVLAD_XLA='maybe': expected a boolean"),
    ([], {"NETVLAD_GPU_MEMORY_GROWTH": "ture"}, "NETVLAD_GPU_MEMORY_GROWTH='ture': expected a"),
    (["--min-image-side", "8"], {}, "--min-image-side: expected an integer at least 16"),
    (["--max-images-per-request", "100"], {}, "exceeds --max-queue-size (64)"),
    (["--resize", "fit:8"], {}, "at least --min-image-side (16)"),
    (["--warmup-sizes", "480x10"], {}, "smaller than --min-image-side"),
])
def test_bad_values_are_refused_naming_the_flag(argv, env, message, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_config(argv, env)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_setting_with_its_environment_variable():
    text = build_parser().format_help()
    for field in ServerConfig.__dataclass_fields__:
        if field == "model_is_default":
            continue
        assert f"--{field.replace('_', '-')}" in text
        assert f"NETVLAD_{field.upper()}" in text


def test_a_directly_built_config_has_the_flag_tables_defaults():
    """One place for defaults: ServerConfig() equals what no flag and no variable give."""
    built, parsed = ServerConfig(), parse_config([], {})
    for option in SERVER_OPTIONS:
        if option.key != "model":
            assert getattr(built, option.key) == getattr(parsed, option.key), option.key
    assert built.decode_threads == min(4, os.cpu_count() or 1)


@pytest.mark.parametrize(("fields", "message"), [
    ({"port": 70000}, "port=70000: expected an integer between 0 and 65535"),
    ({"max_batch_size": 0}, "max_batch_size=0: expected an integer between 1 and 4096"),
    ({"precision": "BF16"}, "precision='BF16': expected one of"),
    ({"precision": "FLOAT32"}, "not a value --precision takes"),
    ({"port": "7000"}, "port='7000': not a value --port takes"),
    ({"xla": 1}, "xla=1: not a value --xla takes"),
    ({"max_queue_delay_ms": -1.0}, "expected a number >= 0"),
    ({"warmup_sizes": ((480, 0),)}, "expected HEIGHTxWIDTH"),
    ({"max_images_per_request": 100}, "exceeds --max-queue-size (64)"),
    ({"tls_cert": "a.pem"}, "--tls-cert and --tls-key go together"),
])
def test_a_directly_built_config_is_checked_like_flags(fields, message):
    with pytest.raises(ConfigError) as caught:
        ServerConfig(**fields)
    assert message in str(caught.value)
    with pytest.raises(ConfigError):  # dataclasses.replace builds anew: checked as well
        dataclasses.replace(ServerConfig(), **fields)


def test_good_direct_values_are_accepted():
    config = ServerConfig(max_queue_delay_ms=0, warmup_sizes=(), resize=Resize(320),
                          precision="bfloat16", xla=True, tls_cert="c.pem", tls_key="k.pem")
    assert config.max_queue_delay_ms == 0 and config.warmup_sizes == ()


def test_an_empty_variable_counts_as_unset():
    env = {"NETVLAD_PORT": "", "NETVLAD_GPU_MEMORY_GROWTH": " ", "NETVLAD_WARMUP_SIZES": ""}
    config = parse_config([], env)
    assert (config.port, config.gpu_memory_growth, config.warmup_sizes) == (
        50051, True, ((480, 640),))
    assert parse_config([], {"NETVLAD_WARMUP_SIZES": "none"}).warmup_sizes == ()


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("TRUE", True), ("yes", True), ("On", True),
    ("0", False), ("false", False), ("NO", False), ("off", False),
])
def test_boolean_variables(text, value):
    assert parse_config([], {"NETVLAD_XLA": text}).xla is value
