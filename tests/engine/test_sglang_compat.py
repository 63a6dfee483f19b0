"""The sglang backend's pure parts: our options mapped onto SGLang 0.5.23, ServerArgs built
and validated, the children's metrics endpoints. No engine is started."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from actors.engine_host import sglang_args, sglang_children, sglang_compat
from actors.engine_host.sglang_args import (
    SglangArgsError,
    cpu_threads_bind,
    engine_kwargs,
    validate_sglang_args,
)
from actors.engine_host.sglang_compat import Finish, StreamDeltas, finish_of
from actors.engine_host.spec import HostSpec
from messages.request import OutputOptions, SamplingOptions, StopConditions, TokenLogprob


def spec(**fields: Any) -> HostSpec:
    base: dict[str, Any] = {
        "backend": "sglang",
        "command_endpoint": "ipc:///tmp/c",
        "output_socket": "/tmp/o",
        "dp_size": 1,
        "page_size": 16,
        "kv_events_port": 5557,
        "metrics_endpoints": ["ipc:///tmp/m0", "ipc:///tmp/m1"],
    }
    return HostSpec(**(base | fields))


# --- requests -----------------------------------------------------------------------------------


def test_sampling_params_map_every_option_and_leave_unset_ones_to_sglang() -> None:
    assert sglang_compat.sampling_params(SamplingOptions(), StopConditions(), OutputOptions()) == {
        "max_new_tokens": 128,
        "skip_special_tokens": True,
    }
    params = sglang_compat.sampling_params(
        SamplingOptions(
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            seed=7,
            frequency_penalty=0.1,
            presence_penalty=0.2,
            repetition_penalty=1.1,
            json_schema='{"type": "object"}',
            regex="a+",
        ),
        StopConditions(
            max_tokens=10, min_tokens=2, stop=["\n"], stop_token_ids=[5], ignore_eos=True
        ),
        OutputOptions(skip_special_tokens=False),
    )
    assert params == {
        "max_new_tokens": 10,
        "min_new_tokens": 2,
        "stop": ["\n"],
        "stop_token_ids": [5],
        "ignore_eos": True,
        "skip_special_tokens": False,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "sampling_seed": 7,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
        "repetition_penalty": 1.1,
        "json_schema": '{"type": "object"}',
        "regex": "a+",
    }


def test_sampling_params_are_all_fields_of_sglangs_sampling_params() -> None:
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = sglang_compat.sampling_params(
        SamplingOptions(temperature=0.5, top_p=0.9, top_k=4, min_p=0.1, seed=1, regex="a"),
        StopConditions(min_tokens=1, stop=["x"], stop_token_ids=[1], ignore_eos=True),
        OutputOptions(),
    )
    SamplingParams(**params).verify(vocab_size=1000)  # no unknown key, all in range


def test_generate_kwargs_ask_for_logprobs_rank_and_priority_only_when_given() -> None:
    assert sglang_compat.generate_kwargs("r" * 32, OutputOptions(), None, None) == {
        "rid": "r" * 32,
        "stream": True,
    }
    assert sglang_compat.generate_kwargs("r", OutputOptions(logprobs=0), 1, -3) == {
        "rid": "r",
        "stream": True,
        "return_logprob": True,
        "top_logprobs_num": 0,
        "routed_dp_rank": 1,
        "priority": -3,
    }


def test_token_ids_come_from_a_list_or_a_tokenizer_mapping() -> None:
    assert sglang_compat.token_ids_of([1, 2]) == [1, 2]
    assert sglang_compat.token_ids_of({"input_ids": [3], "attention_mask": [1]}) == [3]


# --- streamed items -----------------------------------------------------------------------------


def item(ids: list[int], text: str, **meta: Any) -> dict[str, Any]:
    return {"text": text, "output_ids": ids, "meta_info": meta}


def test_incremental_items_are_deltas_already() -> None:
    deltas = StreamDeltas(incremental=True, logprobs=False)
    first = deltas.next(item([5], "The", prompt_tokens=9, cached_tokens=0))
    second = deltas.next(item([6, 7], " cat", cached_tokens=0))
    assert (first.token_ids, first.text, second.token_ids, second.text) == (
        [5],
        "The",
        [6, 7],
        " cat",
    )
    assert (deltas.completion_tokens, deltas.prompt_tokens) == (3, 9)


def test_cumulative_items_are_sliced_into_deltas() -> None:
    deltas = StreamDeltas(incremental=False, logprobs=True)
    lp1 = [(-0.1, 5, None)]
    lp2 = [(-0.1, 5, None), (-0.2, 6, None), (-0.3, 7, None)]
    top2 = [[(-0.1, 5, None)], [(-0.2, 6, None)], [(-0.3, 7, None), (-1.0, 8, None)]]
    first = deltas.next(item([5], "The", output_token_logprobs=lp1, output_top_logprobs=top2[:1]))
    second = deltas.next(
        item([5, 6, 7], "The cat", output_token_logprobs=lp2, output_top_logprobs=top2)
    )
    assert (first.token_ids, first.text) == ([5], "The")
    assert (second.token_ids, second.text) == ([6, 7], " cat")
    assert second.logprobs == [
        TokenLogprob(token_id=6, logprob=-0.2, top=[(6, -0.2)]),
        TokenLogprob(token_id=7, logprob=-0.3, top=[(7, -0.3), (8, -1.0)]),
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ({"type": "stop", "matched": 2}, Finish("stop")),
        ({"type": "length", "length": 8}, Finish("length")),
        ("stop", Finish("stop")),
        (
            {"type": "abort", "message": "Abort in waiting queue"},
            Finish("cancelled", message="Abort in waiting queue"),
        ),
        (
            {"type": "abort", "message": "too long", "status_code": 400},
            Finish("error", "invalid_request", "too long"),
        ),
        (
            {"type": "abort", "message": "priority disabled", "status_code": 503},
            Finish("error", "engine_error", "priority disabled"),
        ),
    ],
)
def test_finish_reasons_map_onto_ours(raw: Any, expected: Finish | None) -> None:
    assert finish_of({"finish_reason": raw}) == expected


def test_plain_makes_numpy_scalars_encodable() -> None:
    import msgspec
    import numpy as np

    value = {"a": np.float64(1.5), "b": [np.int64(2), np.bool_(True)], 3: (None, "x")}
    assert sglang_compat.plain(value) == {"a": 1.5, "b": [2, True], "3": [None, "x"]}
    msgspec.msgpack.encode(sglang_compat.plain(value))


# --- ServerArgs ----------------------------------------------------------------------------------


def test_validation_names_each_unknown_or_node_owned_key() -> None:
    assert validate_sglang_args({"mem_fraction_static": 0.5, "device": "cpu"}) == []
    assert validate_sglang_args({"bogus": 1, "attention_backnd": "x", "dp_size": 2}) == [
        "engine.sglang.bogus: not a field of SGLang's ServerArgs",
        "engine.sglang.attention_backnd: not a field of SGLang's ServerArgs "
        "(did you mean 'attention_backend'?)",
        "engine.sglang.dp_size: set by the node; use engine.dp_size instead",
    ]


def test_engine_kwargs_put_the_users_table_over_the_cpu_defaults() -> None:
    kwargs = engine_kwargs(
        spec(sglang={"mem_fraction_static": 0.5}, replay_port=6000),
        Path("/models/m"),
        "m",
    )
    assert kwargs["mem_fraction_static"] == 0.5  # the user's
    assert kwargs["attention_backend"] == "torch_native"  # a CPU default
    assert kwargs["sleep_on_idle"] is True  # an idle scheduler must not spin a core
    assert kwargs["incremental_streaming_output"] is True
    assert (kwargs["model_path"], kwargs["served_model_name"]) == ("/models/m", "m")
    assert (kwargs["page_size"], kwargs["dp_size"]) == (16, 1)
    assert json.loads(kwargs["kv_events_config"]) == {
        "publisher": "zmq",
        "endpoint": "tcp://127.0.0.1:5557",
        "topic": "kv-events",
        "bind": True,
        "replay_endpoint": "tcp://127.0.0.1:6000",
    }
    assert set(sglang_args.DEFAULTS) | set(sglang_args.CPU_DEFAULTS) <= set(
        sglang_compat.server_args_fields()
    )


def test_a_gpu_device_gets_sglangs_own_defaults() -> None:
    kwargs = engine_kwargs(spec(sglang={"device": "cuda"}), Path("/m"), "m")
    assert kwargs["device"] == "cuda"
    assert "attention_backend" not in kwargs
    assert "max_total_tokens" not in kwargs


def test_engine_kwargs_refuse_bad_tables_and_missing_endpoints() -> None:
    with pytest.raises(SglangArgsError, match=r"engine\.sglang\.bogus: not a field"):
        engine_kwargs(spec(sglang={"bogus": 1}), Path("/m"), "m")
    with pytest.raises(SglangArgsError, match="metrics_endpoints: 2 given for dp_size 3"):
        engine_kwargs(spec(dp_size=3), Path("/m"), "m")


def test_unexpected_keyword_is_read_from_serverargs_type_error() -> None:
    assert sglang_compat.unexpected_keyword(TypeError("Unexpected keyword argument 'x'")) == "x"
    assert sglang_compat.unexpected_keyword(TypeError("something else")) is None


@pytest.mark.parametrize(
    ("cores", "dp_size", "expected"),
    [
        ({0, 1}, 2, "0|1"),
        ({0, 1}, 1, None),
        ({0}, 2, None),
        (set(range(8)), 2, "0-3|4-7"),
        ({0, 2, 4, 6}, 2, "0,2|4,6"),
    ],
)
def test_cpu_threads_are_split_between_dp_ranks(
    monkeypatch: pytest.MonkeyPatch, cores: set[int], dp_size: int, expected: str | None
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: cores)
    assert cpu_threads_bind(dp_size) == expected


# --- children ------------------------------------------------------------------------------------


def test_each_scheduler_gets_the_metrics_endpoint_of_its_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(sglang_children.METRICS_ENV, raising=False)
    assert sglang_children.metrics_endpoint(0) is None
    monkeypatch.setenv(sglang_children.METRICS_ENV, json.dumps(["ipc://a", "ipc://b"]))
    assert sglang_children.metrics_endpoint(None) == "ipc://a"  # dp_size 1
    assert sglang_children.metrics_endpoint(1) == "ipc://b"
    monkeypatch.setenv("SGLANG_DP_RANK", "1")
    assert sglang_children.metrics_endpoint(None) == "ipc://b"
    with pytest.raises(ValueError, match="no endpoint for DP rank 2"):
        sglang_children.metrics_endpoint(2)


class _Tokenizer:
    """What template detection reads of a tokenizer: its chat template and vocabulary."""

    def __init__(self, template: str | None, vocab: tuple[str, ...] = ()) -> None:
        self.chat_template = template
        self._vocab = {token: i for i, token in enumerate(vocab)}

    def get_vocab(self) -> dict[str, int]:
        return self._vocab


SMOLLM2_TEMPLATE = (  # the built-in model's: it renders no tools and no reasoning
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN3_LIKE_TEMPLATE = (  # tools in <tool_call> tags, thinking on unless enable_thinking=false
    "{%- if tools %}<tools>{{ tools | tojson }}</tools>{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{%- if message.tool_calls %}<tool_call>{{ message.tool_calls | tojson }}</tool_call>"
    "{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{%- endif %}{%- endif %}"
)


def test_the_builtin_models_template_names_no_parser() -> None:
    assert sglang_compat.detected_parsers(_Tokenizer(SMOLLM2_TEMPLATE), {}) == {}
    assert sglang_compat.detected_parsers(_Tokenizer(None), {}) == {}


def test_parsers_are_detected_from_a_template_by_sglangs_rules() -> None:
    found = sglang_compat.detected_parsers(_Tokenizer(QWEN3_LIKE_TEMPLATE, ("<think>",)), {})
    assert found == {
        "tool_call_parser": "qwen",
        "reasoning_parser": "qwen3",
        "force_reasoning": False,
    }


def test_parsers_set_in_engine_sglang_win_over_detection() -> None:
    given = {"tool_call_parser": "hermes", "reasoning_parser": "deepseek-r1"}
    found = sglang_compat.detected_parsers(_Tokenizer(SMOLLM2_TEMPLATE), given)
    assert found == {**given, "force_reasoning": False}
