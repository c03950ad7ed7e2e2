"""Studies: what peftkit measures with everything below. Experiments (`run`, `compare`, the
results cache), tuning (Optuna), choosing a method (`selection` by rules, `recommend` from
measured evidence), the principles of notebook 01, the seed article's API (`article`; its
evaluation and monitoring in `article_eval`) and its claims checked (`article_checks`), and the
compression and serving studies of notebooks 05 and 07, the LoRA variants' claims of notebook 11
(`variants`), merging adapters (`merging`: task arithmetic, TIES, DARE, cat, SVD, adapter
averaging; `merge_study`: LoraHub-style learned weights, scoring adapters on every domain), what
fine-tuning forgets (`forgetting`), and federated adaptation (`federated`: aggregation by FedIT,
FFA-LoRA, FLoRA and FedAvg; `federated_sim`: the in-process simulator; `flower_app`: the same client
and server on Flower, which only that module imports).

May import: every layer below. Nothing below imports it.
"""
