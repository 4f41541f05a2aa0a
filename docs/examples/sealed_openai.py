"""The official `openai` client talking to `tessera serve --tee` end to end encrypted.

    tessera verify-serve URL --api-key KEY --sev-snp-measurement HEX --save attestation.json
    python docs/examples/sealed_openai.py URL KEY attestation.json

`tessera verify-serve` checks the TEE evidence (vendor certificate chains, the measurement, a
fresh nonce, the weights' hash) and saves the attestation it checked. This client pins the keys
in it: every request body is HPKE-sealed to the attested key (so a gateway or load balancer that
terminates TLS sees only ciphertext), every response — or each streamed event, as it arrives —
is opened with a one-time key of ours, and its signature over the exact bytes exchanged is
checked against the attested signing key.

Needs: openai (3.57: it uses httpx2), pyhpke, blake3, cryptography.
"""

import json
import os
import sys

import blake3
import httpx2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from openai import OpenAI
from pyhpke import AEADId, CipherSuite, KDFId, KEMId

SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305)


class OpenedStream(httpx2.SyncByteStream):
    """A sealed event stream, opened event by event as it arrives; its signature (a comment
    after the last event) is checked over every byte received before it, and `[DONE]` is handed
    on only once it has: a stream whose signature fails raises instead of ending, so its text
    counts as verified only when the stream ends normally."""

    def __init__(self, response, wire, ours, signer, response_id):
        self.response, self.wire, self.ours = response, wire, ours
        self.signer, self.response_id = signer, response_id

    def __iter__(self):
        buffer, signed, index, done = b"", blake3.blake3(), 0, None
        aad = blake3.blake3(self.wire).digest()
        for chunk in self.response.iter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event.startswith(b": tessera-signature "):
                    message = (b"tessera-serve-response-v1\n" + self.response_id.encode() + b"\n" + aad
                               + signed.digest())
                    self.signer.verify(bytes.fromhex(event[len(b": tessera-signature "):].decode()), message)
                    if done is not None:
                        yield done
                    return
                signed.update(event + b"\n\n")
                sealed = bytes.fromhex(event.removeprefix(b"data: ").decode())
                recipient = SUITE.create_recipient_context(sealed[:32], self.ours.private_key,
                                                           info=b"tessera/v1/serve-response")
                plain = b"data: " + recipient.open(sealed[32:], aad=aad + index.to_bytes(8, "little")) + b"\n\n"
                index += 1
                if plain == b"data: [DONE]\n\n":
                    done = plain  # held until the signature checks: a client stops reading at [DONE]
                else:
                    yield plain
        raise ValueError("the stream ended without its signature")

    def close(self):
        self.response.close()


class SealedTransport(httpx2.BaseTransport):
    """Seals each request to the attested key and opens and checks each response."""

    def __init__(self, attestation):
        self.server_key = SUITE.kem.deserialize_public_key(bytes.fromhex(attestation["sealing_key"]))
        self.signer = Ed25519PublicKey.from_public_bytes(bytes.fromhex(attestation["signing_key"]))
        self.inner = httpx2.HTTPTransport()

    def handle_request(self, request):
        ours = SUITE.kem.derive_key_pair(os.urandom(32))  # a one-time key for this response
        our_public = ours.public_key.to_public_bytes()
        enc, sender = SUITE.create_sender_context(self.server_key, info=b"tessera/v1/serve-request")
        wire = enc + sender.seal(request.read(), aad=our_public)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "content-type")}
        headers.update({"content-type": "application/vnd.tessera.sealed", "x-tessera-seal-to": our_public.hex(),
                        "x-tessera-strict": "1"})
        response = self.inner.handle_request(httpx2.Request(request.method, request.url, headers=headers,
                                                            content=wire))
        if response.headers.get("content-type", "").startswith("text/event-stream"):  # streamed, sealed
            opened = OpenedStream(response, wire, ours, self.signer, response.headers["x-tessera-response-id"])
            return httpx2.Response(response.status_code, headers={"content-type": "text/event-stream"}, stream=opened)
        raw = response.read()
        if response.headers.get("content-type") != "application/vnd.tessera.sealed":
            return httpx2.Response(response.status_code, headers=response.headers, content=raw)  # refused in the clear
        response_id = response.headers.get("x-tessera-response-id")
        if response_id is not None:  # a completion: signed over exactly these bytes by the attested key
            message = (b"tessera-serve-response-v1\n" + response_id.encode() + b"\n"
                       + blake3.blake3(wire).digest() + blake3.blake3(raw).digest())
            self.signer.verify(bytes.fromhex(response.headers["x-tessera-response-signature"]), message)
        recipient = SUITE.create_recipient_context(raw[:32], ours.private_key, info=b"tessera/v1/serve-response")
        plain = recipient.open(raw[32:], aad=blake3.blake3(wire).digest() + (0).to_bytes(8, "little"))
        return httpx2.Response(response.status_code, headers={"content-type": "application/json"}, content=plain)


def main():
    url, key, path = sys.argv[1:4]
    with open(path) as f:
        attestation = json.load(f)
    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                    http_client=httpx2.Client(transport=SealedTransport(attestation)))
    reply = client.chat.completions.create(model=attestation["model"], max_tokens=16,
                                           messages=[{"role": "user", "content": "Say something private."}])
    print(f"{reply.id}: {reply.choices[0].message.content!r} (sealed both ways, signature checked)")
    stream = client.chat.completions.create(model=attestation["model"], max_tokens=16, stream=True,
                                            messages=[{"role": "user", "content": "And streamed?"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    print(f"streamed: {text!r} (each event opened as it came, the stream's signature checked)")


if __name__ == "__main__":
    main()
