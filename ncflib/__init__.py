"""The ncf library: what ncf.py, inference.py, convert.py, prepare.py and hubconf.py run, one
module per concern. A package, so that torch.hub loads it beside a caller's own modules of the
same names (a top-level `runtime` or `utils` of theirs would stand in for ours).

    cli          the one-line contract: errors, run_main and signals, warnings, output checks
    files        atomic writes, durable renames, torch.save / torch.load, the directory lock
    cache        the cache's files, version, digests, metadata and id maps (no torch)
    paper_files  the NCF paper's pre-split files (.train.rating, .test.rating, .test.negative)
    recipe       the reference's training settings, ncf.py's defaults (no torch)
    runtime      the plan: device, precision, implementation, chunks; the collectives
    models       the NCF family (NeuMF, GMF, MLP, MF), its defaults and checks, scoring copy
    cpu_fused    --impl cpu_fused: CPU autograd Functions
    fused        --impl fused: Triton kernels for the embedding layer
    training     the run's settings, the training step, the history of epochs
    evaluation   HR@K, NDCG@K and MRR, the scoring model, sampled and full-ranking evaluation
    checkpoints  model.pth and last.pth: read, check, save; the checkpoint directory
    recommend    --mode recommend: each user's top-K unseen items, as CSV
"""
