"""llama.cpp's own view of a GGUF model: hyperparameters, parameter count, tensor bytes."""

from __future__ import annotations


def facts(path) -> dict[str, int]:
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not load {path}"
    try:
        return {
            "n_embd": llama_cpp.llama_model_n_embd(model), "n_layer": llama_cpp.llama_model_n_layer(model),
            "n_head": llama_cpp.llama_model_n_head(model), "n_head_kv": llama_cpp.llama_model_n_head_kv(model),
            "n_ctx_train": llama_cpp.llama_model_n_ctx_train(model), "n_swa": llama_cpp.llama_model_n_swa(model),
            "rope_type": llama_cpp.llama_model_rope_type(model),
            "n_vocab": llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)),
            "size": llama_cpp.llama_model_size(model), "n_params": llama_cpp.llama_model_n_params(model),
        }
    finally:
        llama_cpp.llama_model_free(model)
