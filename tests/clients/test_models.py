"""`GET /v1/models` through `client.models.list()`."""

import openai


def test_models_list_has_served_model(client: openai.OpenAI, model: str, max_model_len: int):
    page = client.models.list()
    ids = [m.id for m in page.data]
    assert model in ids, ids
    card = next(m for m in page.data if m.id == model)
    assert card.object == "model"
    assert isinstance(card.created, int) and card.created > 0
    assert isinstance(card.owned_by, str) and card.owned_by
    # vLLM's extra field, kept by the SDK as an extra attribute.
    assert card.model_extra.get("max_model_len") == max_model_len, card

