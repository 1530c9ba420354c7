from polm.tasks import TASKS, add_scratchpad, get_task, render


def test_splits_are_fixed_and_disjoint():
    for task in TASKS.values():
        train, test = task.examples("train"), task.examples("test")
        assert len(test) == 500 and len(train) > 5000
        assert not {e.prompt for e in train} & {e.prompt for e in test}
        assert task.examples("test", 3) == test[:3]


def test_add_scratchpad_is_correct_for_every_test_example():
    task = get_task("add")
    for ex in task.examples("test"):
        a, b = map(int, ex.prompt.split("+"))
        assert ex.target == str(a + b)
        assert task.score(ex.answer, ex) == 1.0
    assert add_scratchpad(57, 468) == "7+8+0=15 5+6+1=12 0+4+1=05 => 525"


def test_compare_answers_are_right_and_cover_all_three_words():
    task = get_task("compare")
    words = set()
    for ex in task.examples("train")[:5000] + task.examples("test"):
        a, b = map(int, ex.prompt.split()[1:])
        assert ex.target == ("more" if a > b else "less" if a < b else "same")
        words.add(ex.target)
    assert words == {"more", "less", "same"}


def test_scorer_rejects_wrong_answers():
    task = get_task("add")
    ex = task.examples("test", 1)[0]
    assert task.score(ex.answer.replace("=> ", "=> 9"), ex) == 0.0
    assert task.score("", ex) == 0.0
    rev = get_task("reverse").examples("test", 1)[0]
    assert get_task("reverse").score(rev.target[::-1] + "x", rev) == 0.0


def test_trl_renderings():
    msg = render("add", "test", "messages", 2)[0]["messages"]
    assert [m["role"] for m in msg] == ["user", "assistant"]
    pc = render("reverse", "test", "prompt_completion", 1)[0]
    assert pc["prompt"][0]["role"] == "user" and pc["completion"][0]["role"] == "assistant"
    po = render("add", "test", "prompt_only", 1)[0]
    assert set(po) == {"prompt", "answer"}
