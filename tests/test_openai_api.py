"""OpenAI's API on `planer serve`, driven by OpenAI's own Python client over real HTTP: completions, chat
completions through an imported model's chat template, streaming, stop strings, abandoned streams, bad input."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from planer.arch import BlockSpec
from planer.export import export_lm
from planer.nn import LM
from tests.conftest import small_arch
from tests.test_serve import _metric, abandoned, random_build, running

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return random_build(tmp_path_factory.mktemp("build"))


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy(model: LM, ids: list[int], steps: int, eos: int | None = None) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no memories involved): the reference."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
    return out


def test_completions_match_pytorch_and_stream_the_same_text(build_dir):
    build, model = build_dir
    prompt = "Sparse experts"
    expected = bytes(_greedy(model, list(prompt.encode()), 12)).decode("utf-8", errors="replace")
    with running(build) as url:
        client = _client(url)
        assert [m.id for m in client.models.list().data] == [build.name]
        done = client.completions.create(model=build.name, prompt=prompt, max_tokens=12, temperature=0)
        chunks = list(client.completions.create(model=build.name, prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert done.object == "text_completion" and done.model == build.name
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (14, 12, 26)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stop_strings_end_the_text_before_them_streamed_or_not(build_dir):
    build, model = build_dir
    prompt = "The quick"
    text = bytes(_greedy(model, list(prompt.encode()), 24)).decode("utf-8", errors="replace")
    # a string of two ASCII characters the greedy continuation reaches (a model of random bytes also says bytes
    # that are not whole characters)
    start = next(i for i in range(4, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    stop = text[start:start + 2]
    expected = text[:text.find(stop)]
    with running(build) as url:
        client = _client(url)
        done = client.completions.create(model=build.name, prompt=prompt, max_tokens=24, temperature=0,
                                         stop=[stop, "never appears \u2603"])
        streamed = list(client.completions.create(model=build.name, prompt=prompt, max_tokens=24, temperature=0,
                                                  stop=stop, stream=True))
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def chat_build(tmp_path_factory):
    """A model with its own tokenizer, end-of-text token and chat template, as `planer import` lays one out."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp_path_factory.mktemp("chat")
    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "the", "cat", "sat", "on", "mat"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    (out / "tokenizer").mkdir()
    tok.save(str(out / "tokenizer" / "tokenizer.json"))
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": template}))
    arch = small_arch([BlockSpec.attn(2, 16), BlockSpec.ffn(64)], vocab_size=len(words), tgt_len=8, mem_len=64)
    torch.manual_seed(3)
    arch.save(out / "arch.json")
    return out, LM(arch).eval(), tok


def test_chat_completions_read_the_models_chat_template_and_stop_at_its_end_of_text(chat_build):
    transformers = pytest.importorskip("transformers")
    build, model, tok = chat_build
    messages = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "sat on the mat"}]
    reference_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(build / "tokenizer" / "tokenizer.json"),
        chat_template=json.loads((build / "tokenizer" / "tokenizer_config.json").read_text())["chat_template"])
    prompt = reference_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    eos = tok.token_to_id("<|im_end|>")
    with torch.no_grad():  # the end-of-text token's logit made 1.2x that of the third word greedy would say
        out = model.embed.weight if model.head is None else model.head.weight
        out[eos] = 1.2 * out[_greedy(model, ids, 3)[2]]
    export_lm(model, build / "model.onnx")
    answer = _greedy(model, ids, 20, eos)
    assert len(answer) < 20  # it stopped at the end-of-text token
    with running(build) as url:
        client = _client(url)
        done = client.chat.completions.create(model=build.name, messages=messages, max_tokens=20, temperature=0)
        streamed = list(client.chat.completions.create(model=build.name, messages=messages, max_tokens=20,
                                                       temperature=0, stream=True))
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == tok.decode(answer)
    assert done.choices[0].finish_reason == ("stop" if len(answer) < 20 else "length")
    assert done.usage.prompt_tokens == len(ids)
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == tok.decode(answer)
    assert streamed[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_bad_requests_get_openai_shaped_4xx(build_dir):
    build, _ = build_dir
    with running(build) as url:
        client = _client(url)
        with pytest.raises(openai.BadRequestError) as no_template:
            client.chat.completions.create(model=build.name, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.NotFoundError) as unknown:
            client.completions.create(model="gpt-4o", prompt="hi")
        with httpx.Client(base_url=url, timeout=30) as raw:
            bad = {name: raw.post("/v1/completions", json={"model": build.name, "prompt": "hi", **body})
                   for name, body in {"stream": {"stream": "yes"}, "stop": {"stop": 5}, "n": {"n": 2},
                                      "max_tokens": {"max_tokens": 0}, "temperature": {"temperature": 3},
                                      "logprobs": {"logprobs": 2}}.items()}
            unparsable = raw.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert no_template.value.status_code == 400 and "no chat template" in no_template.value.message
    assert unknown.value.status_code == 404 and unknown.value.code == "model_not_found"
    for name, r in bad.items():
        error = r.json()["error"]
        assert r.status_code == 400 and error["type"] == "invalid_request_error", (name, r.text)
        assert error["param"] == name or name == "logprobs" and "logprobs" in error["message"], (name, error)
    assert "one choice per request" in bad["n"].json()["error"]["message"]
    assert unparsable.status_code == 400 and "malformed JSON" in unparsable.json()["error"]["message"]


def test_an_abandoned_stream_stops_generating(build_dir):
    build, _ = build_dir
    with running(build, max_new_tokens=20000) as url, httpx.Client(base_url=url, timeout=30) as client:
        stopped = abandoned(url, client, "/v1/completions",
                            {"model": build.name, "prompt": "going away", "max_tokens": 20000, "stream": True})
        metrics = client.get("/metrics").text
    assert stopped < 20000
    assert _metric(metrics, "planer_requests_in_flight") == 0
    assert 0 < _metric(metrics, "planer_generated_tokens_total") < stopped  # counted, though abandoned
