"""OpenStreams: the one place a front end refuses a request id already in flight."""
from trtllm.runtime.request_stream import OpenStreams, RequestStream


def test_a_duplicate_id_is_refused_until_the_first_finishes():
    table = OpenStreams()
    first = RequestStream("x")
    assert table.open(first) is None
    assert "already in flight" in table.open(RequestStream("x"))
    assert table.route(["x", "y"], [False, False]) == [first, None]
    assert table.route(["x"], [True]) == [first]  # finished: forgotten
    assert not table and table.open(RequestStream("x")) is None


def test_closed_refuses_and_hands_back_the_open_streams():
    table = OpenStreams()
    a = RequestStream("a")
    table.open(a)
    assert table.close("the engine shut down") == [a]
    assert table.open(RequestStream("b")) == "the engine shut down" and not table
