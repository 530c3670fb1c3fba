"""The research harness behind the `benchmark_*.py` scripts: the debiasing benchmark (`debiasing`: plan, execute,
routing study, report), perception pretraining of the tiny base (`pretrain`), its language-model pretraining on
real training texts (`text_pretrain`) and the cost measurements (`speed`). It uses the library (`cfmoe.trainer`,
`cfmoe.modeling_cfmoe`); the library never imports it."""
