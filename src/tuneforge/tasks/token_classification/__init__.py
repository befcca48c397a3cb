"""Token classification (entities, clauses, parties): one tag per word, BIO inside, entity-level metrics."""
