"""Training: the one loop (:mod:`.loop`), shared losses (:mod:`.losses`) and ``pumer-plug finetune``
(:mod:`.finetune`, settings in :mod:`.finetune_config`, batches in :mod:`.finetune_data`, files in
:mod:`.finetune_io`)."""
