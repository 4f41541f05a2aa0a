"""Drives `tessera serve` with the official OpenAI Python client, then closes the epoch of usage
it metered into a hub's ledger and checks the payouts.

Run by scripts/test after the Rust tests, against the same debug build:
    TESSERA_BIN=target/debug/tessera python scripts/openai_client_test.py
"""

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import urllib.error
import urllib.request
import openai
from openai import OpenAI

BIN = os.environ.get("TESSERA_BIN", "target/debug/tessera")


def run(*args, **kw):
    return subprocess.run([BIN, *args], check=True, capture_output=True, text=True, **kw).stdout.strip()


def wait_for(path: Path, proc: subprocess.Popen, what: str) -> str:
    for _ in range(600):
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            sys.exit(f"{what} exited early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.1)
    sys.exit(f"{what} did not start")


def expect(exc_type, fn, status, code=None):
    try:
        fn()
    except exc_type as e:
        assert e.status_code == status, (e.status_code, e)
        body = e.body if isinstance(e.body, dict) else {}
        if code is not None:
            assert body.get("code") == code, body
        assert body.get("message"), body
        return
    raise AssertionError(f"expected {exc_type.__name__} ({status})")


def main():
    tmp = Path(tempfile.mkdtemp(prefix="tessera-openai-"))
    ckpt, db = tmp / "ckpt", tmp / "serve.sqlite"
    run("model", "init", "--model", "nano", "--tokenizer", "byte", "--out", str(ckpt))
    key = run("keys", "create", "tester", "--db", str(db))
    limited = run("keys", "create", "limited", "--rpm", "2", "--db", str(db))
    revoked = run("keys", "create", "gone", "--db", str(db))
    run("keys", "revoke", "gone", "--db", str(db))
    addr_file = tmp / "serve.addr"
    serve = subprocess.Popen(
        [BIN, "serve", "--checkpoint", str(ckpt), "--db", str(db), "--addr", "127.0.0.1:0",
         "--addr-file", str(addr_file), "--model-id", "tessera-nano", "--max-body-bytes", "4096"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hub = None
    try:
        base = f"http://{wait_for(addr_file, serve, 'tessera serve')}/v1"
        client = OpenAI(base_url=base, api_key=key, max_retries=0)
        billed = 0  # successful requests made with `key`

        models = client.models.list()
        assert [m.id for m in models.data] == ["tessera-nano"], models
        assert client.models.retrieve("tessera-nano").owned_by == "tessera"

        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
        chat = client.chat.completions.create(model="tessera-nano", messages=messages, max_tokens=6, temperature=0)
        billed += 1
        choice = chat.choices[0]
        assert chat.object == "chat.completion" and choice.message.role == "assistant"
        assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
        u = chat.usage
        assert u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert u.completion_tokens <= 6

        stream = client.chat.completions.create(
            model="tessera-nano", messages=messages, max_tokens=6, temperature=0, stream=True)
        parts, finish, usage = [], None, None
        for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    parts.append(c.delta.content)
                finish = c.finish_reason or finish
        billed += 1
        assert "".join(parts) == choice.message.content, (parts, choice.message.content)
        assert finish == choice.finish_reason and usage is not None and usage.total_tokens == u.total_tokens

        comp = client.completions.create(model="tessera-nano", prompt="To be, or", max_tokens=8, temperature=0)
        billed += 1
        assert comp.object == "text_completion" and comp.usage.completion_tokens <= 8
        text = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model="tessera-nano", prompt="To be, or", max_tokens=8, temperature=0, stream=True)
            if c.choices)
        billed += 1
        assert text == comp.choices[0].text, (text, comp.choices[0].text)

        # Seeded sampling repeats itself.
        a = client.completions.create(model="tessera-nano", prompt="A", max_tokens=10, temperature=1.0, seed=7)
        b = client.completions.create(model="tessera-nano", prompt="A", max_tokens=10, temperature=1.0, seed=7)
        billed += 2
        assert a.choices[0].text == b.choices[0].text

        # logit_bias as the official client sends it (token id → bias; the byte tokenizer's ids are
        # the bytes): +100 forces "z" at every greedy step; the penalties are taken.
        z = client.completions.create(model="tessera-nano", prompt="A", max_tokens=5, temperature=0,
                                      logit_bias={str(ord("z")): 100}, extra_body={"ignore_eos": True})
        assert z.choices[0].text == "zzzzz", z.choices[0].text
        p = client.completions.create(model="tessera-nano", prompt="A", max_tokens=5, temperature=0,
                                      presence_penalty=1.0, frequency_penalty=0.5, extra_body={"ignore_eos": True})
        assert p.usage.completion_tokens == 5, p.usage
        billed += 2
        # n choices and batched prompts: choice i is prompt i // n.
        many = client.completions.create(model="tessera-nano", prompt=["A", "B"], n=2, max_tokens=3, seed=3)
        assert [c.index for c in many.choices] == [0, 1, 2, 3], many
        chats = client.chat.completions.create(model="tessera-nano", messages=messages, n=2, max_tokens=3, seed=3)
        assert len(chats.choices) == 2, chats
        seen = {}
        for chunk in client.completions.create(model="tessera-nano", prompt=["A", "B"], n=2, max_tokens=3, seed=3,
                                               stream=True):
            for c in chunk.choices:
                seen[c.index] = seen.get(c.index, "") + c.text
        assert seen == {c.index: c.text for c in many.choices}, (seen, many)
        billed += 3
        # logprobs as the client types them: completions' parallel arrays, chat's content entries,
        # whole and streamed (the same numbers); greedy picks the likeliest alternative.
        lp = client.completions.create(model="tessera-nano", prompt="A", max_tokens=4, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True}).choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4, lp
        assert all(v <= 0 for v in lp.token_logprobs) and all(abs(max(t.values()) - v) < 1e-6
                                                                 for t, v in zip(lp.top_logprobs, lp.token_logprobs)), lp
        chat_lp = dict(model="tessera-nano", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
        whole = client.chat.completions.create(**chat_lp).choices[0].logprobs.content
        assert whole and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in whole), whole
        streamed = [e.logprob for c in client.chat.completions.create(**chat_lp, stream=True)
                    if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert streamed == [e.logprob for e in whole], (streamed, whole)
        billed += 3
        # A parameter that would change the output and is not implemented is refused by name.
        expect(openai.BadRequestError, lambda: client.chat.completions.create(model="tessera-nano", messages=messages, response_format={"type": "json_object"}), 400, "unsupported_parameter")

        # Every refusal has OpenAI's shape, and none is billed.
        expect(openai.AuthenticationError, lambda: OpenAI(base_url=base, api_key="tsk_nope", max_retries=0).models.list(), 401, "invalid_api_key")
        expect(openai.AuthenticationError, lambda: OpenAI(base_url=base, api_key=revoked, max_retries=0).models.list(), 401, "invalid_api_key")
        expect(openai.NotFoundError, lambda: client.chat.completions.create(model="gpt-4", messages=messages), 404, "model_not_found")
        expect(openai.BadRequestError, lambda: client.completions.create(model="tessera-nano", prompt="x", temperature=5), 400)
        expect(openai.BadRequestError, lambda: client.completions.create(model="tessera-nano", prompt="x", max_tokens=-3), 400)
        expect(openai.BadRequestError, lambda: client.completions.create(model="tessera-nano", prompt="x" * 200, max_tokens=1), 400, "context_length_exceeded")
        expect(openai.APIStatusError, lambda: client.completions.create(model="tessera-nano", prompt="x" * 5000, max_tokens=1), 413, "request_too_large")
        raw = urllib.request.Request(f"{base}/chat/completions", data=b"{oops", method="POST",
                                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        try:
            urllib.request.urlopen(raw)
            raise AssertionError("malformed JSON was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 400 and json.loads(e.read())["error"]["type"] == "invalid_request_error"
        lim = OpenAI(base_url=base, api_key=limited, max_retries=0)
        for _ in range(2):
            lim.completions.create(model="tessera-nano", prompt="x", max_tokens=1)
        expect(openai.RateLimitError, lambda: lim.completions.create(model="tessera-nano", prompt="x", max_tokens=1), 429, "rate_limit_exceeded")

        con = sqlite3.connect(db)
        rows = dict(con.execute("SELECT k.name, COUNT(*) FROM usage u JOIN api_keys k ON k.id = u.key_id GROUP BY k.name"))
        assert rows == {"tester": billed, "limited": 2}, rows
        stored = [r[0] for r in con.execute("SELECT hash FROM api_keys")]
        assert key not in stored and all(len(h) == 64 for h in stored)
        con.close()

        # The epoch's usage, priced, goes into a hub's ledger and pays holders exactly.
        op = tmp / "operator.pem"
        operator = run("keygen", "--out", str(op)).splitlines()[0]
        alloc = tmp / "allocations.toml"
        alloc.write_text('backers = 7000\n"early-backer" = 3000\n')
        hub_addr = tmp / "hub.addr"
        hub = subprocess.Popen(
            [BIN, "hub", "--model", "tiny", "--synthetic-chars", "20000", "--rounds", "1", "--operator", operator,
             "--funding-share", "0.25", "--allocations", str(alloc), "--database", f"sqlite://{tmp / 'hub.sqlite'}",
             "--store", str(tmp / "blobs"), "--listen", "127.0.0.1:0", "--addr-file", str(hub_addr),
             "--key", str(tmp / "hub.pem")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        hub_url = f"http://{wait_for(hub_addr, hub, 'tessera hub')}"
        prices = tmp / "prices.toml"
        prices.write_text("prompt_per_million = 1000000\ncompletion_per_million = 3000000\n")
        out = run("economy", "close", "--db", str(db), "--hub", hub_url, "--key", str(op), "--prices", str(prices))
        assert "epoch 0 closed" in out, out
        report = json.loads(run("economy", "report", "--hub", hub_url, "--json"))
        tokens = {name: (p, c) for name, p, c in sqlite3.connect(db).execute(
            "SELECT k.name, SUM(prompt_tokens), SUM(completion_tokens) FROM usage u JOIN api_keys k ON k.id = u.key_id GROUP BY k.name")}
        revenue = sum(p * 1 + c * 3 for p, c in tokens.values())
        epoch = report["epochs"]["0"]
        assert epoch["revenue"] == revenue and epoch["funding"] == revenue // 4, (epoch, revenue)
        paid = report["payouts"]
        assert sum(paid.values()) == epoch["payable"] == revenue - revenue // 4, paid
        assert abs(paid["backers"] - 0.7 * epoch["payable"]) <= 1 and abs(paid["early-backer"] - 0.3 * epoch["payable"]) <= 1
        verified = json.loads(run("ledger", "verify", "--hub", hub_url, "--json"))
        assert verified["verified"] and verified["payouts"] == paid
        # The same epoch cannot be closed twice.
        again = subprocess.run([BIN, "economy", "close", "--db", str(db), "--hub", hub_url, "--key", str(op), "--epoch", "0"],
                               capture_output=True, text=True)
        assert again.returncode != 0 and "409" in again.stderr, again.stderr
        print(f"openai {openai.__version__} client: models, chat, completions (plain and streamed), seeded sampling "
              f"and 9 kinds of refusal OK; {billed + 2} requests billed; epoch 0: revenue {revenue} µ, "
              f"payouts {paid}")
        attested_serving(tmp)
    finally:
        for p in (serve, hub):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)


def attested_serving(tmp: Path):
    """`serve --insecure-dev-tee`, checked by `tessera verify-serve`, then the sealed-client
    example of docs/serving.md: it works with the verified keys and fails with any other."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs" / "examples"))
    import sealed_openai
    import httpx2
    ckpt, db, addr_file = tmp / "ckpt", tmp / "tee.sqlite", tmp / "tee.addr"
    key = run("keys", "create", "tee", "--db", str(db))
    serve = subprocess.Popen(
        [BIN, "serve", "--checkpoint", str(ckpt), "--db", str(db), "--addr", "127.0.0.1:0",
         "--addr-file", str(addr_file), "--model-id", "tessera-nano-r0", "--insecure-dev-tee"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://{wait_for(addr_file, serve, 'tessera serve --insecure-dev-tee')}"
        saved = tmp / "attestation.json"
        out = run("verify-serve", url, "--api-key", key, "--allow-insecure-dev", "--save", str(saved))
        assert out.count("\nok  ") >= 9 and "sealed stream" in out, out
        attestation = json.loads(saved.read_text())

        def ask(att, stream=False):
            client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                            http_client=httpx2.Client(transport=sealed_openai.SealedTransport(att)))
            reply = client.chat.completions.create(model=att["model"], max_tokens=8, temperature=0, stream=stream,
                                                   messages=[{"role": "user", "content": "private"}])
            return [c for c in reply] if stream else reply

        reply = ask(attestation)
        assert reply.model == "tessera-nano-r0" and reply.choices[0].finish_reason in ("stop", "length"), reply
        chunks = ask(attestation, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == reply.choices[0].message.content, (streamed, reply)
        # Another signing key (the attestation of some other server): the signature check fails.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
        other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        for stream in (False, True):
            try:
                ask({**attestation, "signing_key": other}, stream=stream)
                raise AssertionError(f"a response signed by another key was accepted (stream={stream})")
            except Exception as e:  # cryptography's InvalidSignature, surfaced through the client
                assert "InvalidSignature" in repr(e) or "InvalidSignature" in repr(e.__cause__) or \
                    "InvalidSignature" in repr(e.__context__), repr(e)
        # Sealed to a key the server does not hold: refused in the clear, nothing opened.
        stranger = sealed_openai.SUITE.kem.derive_key_pair(os.urandom(32)).public_key.to_public_bytes().hex()
        try:
            ask({**attestation, "sealing_key": stranger})
            raise AssertionError("a request sealed to another key was answered")
        except openai.BadRequestError as e:
            assert e.body.get("code") == "unsealable", e.body
        print("attested serving: verify-serve passed 9 checks; the sealed openai client worked with the verified "
              "keys, whole and streamed, and refused another signing key (both) and another sealing key")
    finally:
        serve.terminate()
        serve.wait(timeout=30)


if __name__ == "__main__":
    main()
