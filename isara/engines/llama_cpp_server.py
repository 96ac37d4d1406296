"""llama-cpp-python's OpenAI-compatible server (the `llama-cpp-python[server]` extra) on a model isara builds:

    python -m isara.engines.llama_cpp_server --model M.gguf --port 8000 [--n_ctx 2048 --n_threads 2 ...]

What `python -m llama_cpp.server` serves, with two differences, so that its completions are exactly the in-process
sequential engine's (isara.engines.llama.complete): the Llama is built by isara.engines.llama.load_llama (extra
buffer types off: the AMX segfault), and every completion starts from an empty KV cache (llama-cpp-python would
reuse the previous request's prompt prefix, and a completion would depend on the request before it). The server
answers one request at a time (llama-cpp-python's server holds a lock around its one Llama). The server engine
(isara.engines.server.LocalServer) starts this when no llama-server binary is there.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--n_ctx", type=int, default=2048)
    ap.add_argument("--n_threads", type=int, default=2)
    ap.add_argument("--n_gpu_layers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import uvicorn
    from llama_cpp.server import app as server_app
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from isara.engines.llama import load_llama

    llm = load_llama(args.model, args.n_ctx, args.n_threads, args.seed, args.n_gpu_layers)

    class FreshCache(type(llm)):
        """The same Llama; each completion (the server calls the Llama itself) from an empty KV cache."""

        def __call__(self, *a, **kw):
            self.reset()
            return super().__call__(*a, **kw)

    llm.__class__ = FreshCache
    LlamaProxy.load_llama_from_model_settings = staticmethod(lambda settings: llm)  # the server's one model
    app = server_app.create_app(server_settings=ServerSettings(host=args.host, port=args.port),
                                model_settings=[ModelSettings(model=args.model, model_alias="isara")])
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
