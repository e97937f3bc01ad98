// bitnet.cpp's side of bitnet_cpp_decode.py: a prefill of 64 tokens, then 32 single-token decode steps,
// through the llama.cpp API of bitnet.cpp's fork (build: README.md in this folder).
// Usage: bitnet_cpp_bench MODEL.gguf THREADS ROUNDS
// Prints one line per round: "prefill <tok/s> decode <median step ms> <fastest step ms>".
#include "llama.h"
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

int main(int argc, char ** argv) {
    const int threads = atoi(argv[2]), rounds = atoi(argv[3]), prompt = 64, steps = 32;
    llama_backend_init();
    llama_model * model = llama_load_model_from_file(argv[1], llama_model_default_params());
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256; cp.n_batch = 64; cp.n_ubatch = 64; cp.n_threads = threads; cp.n_threads_batch = threads;
    llama_context * ctx = llama_new_context_with_model(model, cp);
    std::vector<llama_token> tokens(prompt);
    for (int i = 0; i < prompt; i++) tokens[i] = 10 + (i * 7919) % 1000;
    for (int r = 0; r < rounds; r++) {
        llama_kv_cache_clear(ctx);
        double t0 = now();
        llama_decode(ctx, llama_batch_get_one(tokens.data(), prompt, 0, 0));
        double prefill = now() - t0;
        std::vector<double> step(steps);
        llama_token token = 11;
        for (int s = 0; s < steps; s++) {
            double t1 = now();
            llama_decode(ctx, llama_batch_get_one(&token, 1, prompt + s, 0));
            volatile float sink = llama_get_logits_ith(ctx, -1)[0];
            (void) sink;
            step[s] = now() - t1;
        }
        std::vector<double> sorted = step;
        std::sort(sorted.begin(), sorted.end());
        printf("prefill %.2f decode %.3f %.3f\n", prompt / prefill, sorted[steps / 2] * 1e3, sorted[0] * 1e3);
        fflush(stdout);
    }
    llama_free(ctx);
    llama_free_model(model);
    return 0;
}
