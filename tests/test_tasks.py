import pytest

from esft.data.tasks import TASKS, get_task, split_of


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_deterministic_disjoint_and_verified(name):
    task = get_task(name)
    train = task.generate(300, seed=1)
    assert train == task.generate(300, seed=1)
    heldout = task.generate(100, seed=1, split="heldout")
    prompts = lambda rs: {r["messages"][0]["content"] for r in rs}  # noqa: E731
    assert not prompts(train) & prompts(heldout)
    assert all(split_of(p) == "heldout" for p in prompts(heldout))
    assert all(task.score(r, r["answer"]) == 1.0 for r in train[:20])
    assert task.score(train[0], train[0]["answer"] + " 1") == 0.0


def test_unknown_task_lists_known_ones():
    with pytest.raises(KeyError, match="arithmetic"):
        get_task("nope")
