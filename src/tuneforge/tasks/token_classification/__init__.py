"""Token classification (entities, clauses, parties): one tag per word, BIO inside, entity-level metrics."""
from tuneforge.tasks.token_classification.task import TokenClassificationTask

TASK = TokenClassificationTask()
