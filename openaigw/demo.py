"""``make demo``: a streamed answer through the gateway, without an OpenAI key.

Starts the fake OpenAI upstream over TLS (with a CA made for the demo), the gateway
under twistd in front of it, and streams a chat completion with the openai SDK.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from openaigw.testing import free_port, make_test_ca, start_fake_upstream, start_gateway, stop_process

CONFIG = """\
[gateway]
listen = tcp:port={port}:interface=127.0.0.1

[upstream:fake-openai]
scheme = https
nodes = 127.0.0.1:{upstream}
ca_file = {ca}

[route:openai-chat]
uri = /v1/chat/completions
methods = POST
upstream = fake-openai
proxy-rewrite.headers.set.Authorization = Bearer $ENV://OPENAI_API_KEY
"""


def main() -> None:
    import openai

    with tempfile.TemporaryDirectory(prefix="openaigw-demo-") as directory:
        pki = make_test_ca(directory)
        upstream, upstream_port = start_fake_upstream(directory, name="fake-openai")
        port = free_port()
        config = CONFIG.format(port=port, upstream=upstream_port, ca=pki.ca)
        env = dict(os.environ, OPENAI_API_KEY="sk-demo-real-key")
        gateway = start_gateway(directory, config, port, env=env)
        try:
            print(f"gateway on http://127.0.0.1:{port}/v1 -> fake OpenAI on https://127.0.0.1:{upstream_port}")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="gateway-client")
            start = time.monotonic()
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Say hello"}],
                stream=True,
                extra_headers={"X-Fake-Chunks": "10", "X-Fake-Interval-Ms": "200"},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    print(f"{time.monotonic() - start:5.2f}s  {chunk.choices[0].delta.content!r}", flush=True)
            print("each chunk arrived as the upstream sent it (200 ms apart).")
        finally:
            stop_process(gateway)
            stop_process(upstream)


if __name__ == "__main__":
    sys.exit(main())
