"""Token classification (entities, clauses, parties): one tag per word, BIO inside, entity-level metrics. Facts in
spec.py, behaviour in task.py."""
