"""The jobs' MLflow experiment says what kind it is, so the MLflow UI opens it on its runs."""

from __future__ import annotations


def test_the_experiment_is_tagged_for_model_development_new_or_old(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from dfmvr import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        exp_id = tracking.setup_experiment(uri, "dfmvr", tmp_path / "work")
        assert MlflowClient(uri).get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
        # an experiment made before the tag existed gets it when a job next uses it
        old = MlflowClient(uri).create_experiment("older")
        assert "mlflow.experimentKind" not in MlflowClient(uri).get_experiment(old).tags
        assert tracking.setup_experiment(uri, "older", tmp_path / "work") == old
        assert MlflowClient(uri).get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    finally:
        mlflow.set_tracking_uri(None)


def test_the_runs_page_asks_the_ui_for_model_training():
    from dfmvr import tracking

    assert tracking.runs_page("sqlite:////x/mlflow.db", "3") == \
        "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    assert tracking.runs_page("http://user:secret@mlflow:5000/", "7") == \
        "http://mlflow:5000/#/experiments/7?workflowType=machine_learning"
