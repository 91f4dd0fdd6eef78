"""The Hub model cards of a pretraining folder and of an exported classifier (pure functions; the scripts write them
through the trainers' `create_model_card`, see test_run_mim / test_run_image_classification)."""

from modeling_simmim import SimMIMConfig, SimMIMForImageClassification
from modeling_simmim.model_card import classifier_card, pretraining_card
from modeling_simmim.trainer import SimMIMSchedule

SCHEDULE = SimMIMSchedule("cosine", 64, 22, 132, 22, 2.5e-4, 1.25e-6, 1.25e-5)


def test_pretraining_card_lists_recipe_data_steps_loss_and_reconstruction(tmp_path):
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16)
    card = pretraining_card(
        "me/simmim-demo",
        config=config,
        recipe={"base_learning_rate": 2e-3, "depths": [2, 2]},
        data="bundled demo dataset 'digits'",
        global_step=132,
        epoch=6.0,
        final_loss=0.41234,
        eval_loss=0.4,
        schedule=SCHEDULE,
        reconstruction="reconstructions/step_00132.png",
        dataset_id="digits",
        base_model=str(tmp_path),  # a local folder: not Hub metadata
    )
    assert card.startswith("---\nlibrary_name: transformers\n")
    front_matter = card.split("---")[1]
    assert "datasets:\n- digits" in front_matter and "base_model" not in front_matter
    for text in (
        "- simmim",
        "# me/simmim-demo",
        "swin backbone at 64x64 px",
        "| optimizer steps | 132 |",
        "| final training loss | 0.4123 |",
        "| final evaluation loss | 0.4000 |",
        "bundled demo dataset 'digits'",
        f"| initialized from | {tmp_path} |",
        "base_learning_rate: 0.002",
        "depths: [2, 2]",
        "![reconstructions](reconstructions/step_00132.png)",
        "cosine, warmup 22 of 132 steps",
        'AutoModelForMaskedImageModeling.from_pretrained("me/simmim-demo")',  # native: no remote code
    ):
        assert text in card, text
    assert "trust_remote_code" not in card


def test_pretraining_card_asks_for_remote_code_only_where_transformers_has_no_class():
    beit = SimMIMConfig.from_preset("beit_test", mask_patch_size=16)
    card = pretraining_card("me/beit", config=beit, base_model="microsoft/some-encoder")
    assert 'from_pretrained("me/beit", trust_remote_code=True)' in card
    assert "base_model: microsoft/some-encoder" in card.split("---")[1]


def _classifier():
    config = SimMIMConfig.from_preset("swin_test", image_size=32, mask_patch_size=16)
    config.id2label = {0: "cat", 1: "dog"}
    config.label2id = {"cat": 0, "dog": 1}
    return SimMIMForImageClassification(config).config


HISTORY = [
    {"epoch": 1.0, "eval_accuracy": 0.9, "eval_top5_accuracy": 1.0},
    {"epoch": 2.0, "eval_accuracy": 0.7, "eval_top5_accuracy": 1.0},
    {"epoch": 2.0, "eval_accuracy": 0.7, "eval_top5_accuracy": 1.0},  # the final evaluation of the exported weights
]


def test_classifier_card_reports_the_exported_weights_and_how_they_were_chosen():
    last = classifier_card("me/clf", _classifier(), HISTORY, recipe={"layer_decay": 0.9}, schedule=SCHEDULE)
    assert "| top-1 accuracy | 70.00% |" in last and "| weights | the last step's |" in last
    assert "90.00%" not in last  # never the best intermediate score in place of the exported model's
    assert "pipeline_tag: image-classification" in last and 'pipeline("image-classification", model="me/clf")' in last
    assert "layer_decay: 0.9" in last and "| total batch size | 64 |" in last and "2 classes, 32 px" in last
    assert "| initialized from | scratch (no pretraining) |" in last

    best_history = [*HISTORY[:2], {"epoch": 2.0, "eval_accuracy": 0.9}]  # best checkpoint reloaded, then evaluated
    best = classifier_card("me/clf", _classifier(), best_history, best_model_checkpoint="out/checkpoint-10")
    assert "| top-1 accuracy | 90.00% |" in best and "best by validation top-1 (checkpoint-10" in best
    assert "optimistic" in best
    assert "Not evaluated." in classifier_card("me/clf", _classifier(), [])
