"""Everything needed to make a bonefrac model: data scanning and cleanup, audit, augmentation, training, evaluation, export."""
