"""benchmarks/routing_fit.py: per task, the checkpoints' mean scores, the best one, routing's choices and regret."""

from benchmarks.routing_fit import regret, summarize


def scores(digits: float, fashion: float) -> dict:
    return {"digits": {"5-shot": {"knn": digits, "linear": digits + 5}},
            "fashion": {"5-shot": {"knn": fashion, "linear": fashion + 5}}}


def test_regret_is_the_best_checkpoints_knn_minus_the_chosen_ones():
    assert regret(scores(37.0, 41.0), "digits") == 4.0
    assert regret(scores(37.0, 41.0), "fashion") == 0.0
    assert regret(scores(37.0, 41.0), None) is None


def test_summary_over_seeds_names_the_best_checkpoint_and_what_routing_chose():
    runs = []
    for digits, fashion, chosen in ((37.0, 41.0, "fashion"), (39.0, 45.0, "digits")):
        checks = [{"task": "digits-opencv", "chosen": chosen, "correct": chosen == "digits"}]
        runs.append({"checkpoint_scores": {"digits-opencv": scores(digits, fashion),
                                           **{t: scores(50.0, 40.0) for t in ("digits", "fashion", "textures",
                                                                              "photos")}},
                     "routing": {"unlabelled": checks, "labelled": []}})
    task = summarize(runs)["digits-opencv"]
    assert task["checkpoint_means"]["fashion"]["5-shot knn"] == 43.0
    assert task["best_checkpoint"] == "fashion"
    assert task["routing"]["unlabelled"] == {"chosen": {"digits": 1, "fashion": 1}, "domain_correct": 0.5,
                                             "regret_5shot_knn": 3.0}  # (0 + 6) / 2
    assert task["routing"]["labelled"]["domain_correct"] is None
    assert summarize(runs)["digits"]["best_checkpoint"] == "digits"
