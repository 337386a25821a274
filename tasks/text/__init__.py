"""Text tasks: masked-LM pretraining (C4 / local files / the embedded Wikipedia corpus) and GLUE
finetuning data, tokenizers and metrics. Lightning modules and Hydra configs build on these."""
