"""Ready-made handlers: ``sink`` (accept, log, discard) and ``maildir`` (store each message)."""
