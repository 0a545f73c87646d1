"""Finished runs read back from their directories (`_saved_runs`) and their loss
curves drawn (`_loss_curves`)."""
