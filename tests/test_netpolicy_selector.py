"""Calico's selector grammar: what each form means, and properties over random selectors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflannel.policy.selector import (
    MAX_DEPTH,
    All,
    And,
    Eq,
    Has,
    In,
    Ne,
    Not,
    NotIn,
    Or,
    SelectorError,
    parse_selector,
)

BLUE = {"tenant": "blue", "zone": "a"}


@pytest.mark.parametrize("text, labels, expected", [
    ("tenant == 'blue'", BLUE, True),
    ('tenant == "red"', BLUE, False),
    ("tenant != 'red'", BLUE, True),
    ("role != 'db'", BLUE, True),  # an absent key is "not equal"
    ("has(zone)", BLUE, True),
    ("!has(zone)", BLUE, False),
    ("zone in {'a', 'b'}", BLUE, True),
    ("role in {'a'}", BLUE, False),
    ("role not in {'a'}", BLUE, True),  # an absent key is "not in"
    ("zone not in {'a'}", BLUE, False),
    ("tenant == 'blue' && zone == 'b'", BLUE, False),
    ("tenant == 'red' || zone == 'a'", BLUE, True),
    ("!(tenant == 'red' || zone == 'b')", BLUE, True),
    ("all()", {}, True),
    ("", {}, True),  # the empty selector selects everything, as in Calico
    ("x in {}", {"x": ""}, False),
    ("k8s.io/app-name == 'web'", {"k8s.io/app-name": "web"}, True),
])
def test_each_form_means_what_calico_says(text, labels, expected):
    assert parse_selector(text).matches(labels) is expected


def test_and_binds_tighter_than_or_and_not_tighter_than_and():
    assert parse_selector("a == '1' || b == '2' && c == '3'") == Or(
        Eq("a", "1"), And(Eq("b", "2"), Eq("c", "3")))
    assert parse_selector("!has(a) && has(b)") == And(Not(Has("a")), Has("b"))


def test_keywords_can_still_be_label_keys():
    assert parse_selector("has == 'x' && in != 'y' && not not in {'z'}") == And(
        And(Eq("has", "x"), Ne("in", "y")), NotIn("not", frozenset({"z"})))


@pytest.mark.parametrize("text", [
    "tenant ==", "tenant == blue", "has(tenant", "(a == 'b'", "a == 'b')", "a in {'x',}",
    "a = 'b'", "a == 'b' &&", "&& a == 'b'", "a == 'unterminated", "all(x)", "a ~= 'b'",
    "(" * 200 + "all()" + ")" * 200, "!" * 5000 + "all()", "a == 'b' " * 1000,
])
def test_garbage_is_one_line_error(text):
    with pytest.raises(SelectorError) as e:
        parse_selector(text)
    assert "\n" not in str(e.value) and str(e.value)


def test_nesting_deeper_than_the_limit_is_refused_not_a_recursion_error():
    ok = "(" * (MAX_DEPTH - 1) + "all()" + ")" * (MAX_DEPTH - 1)
    assert parse_selector(ok) == All()
    with pytest.raises(SelectorError, match="nested"):
        parse_selector("(" * (MAX_DEPTH + 1) + "all()" + ")" * (MAX_DEPTH + 1))


# -- properties -----------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "tenant", "in", "has", "x.y/z-1"])
VALUES = st.sampled_from(["", "1", "blue", "red", "it's", 'say "hi"'])


def _leaf():
    """Pairs (tree, reference) where reference is a Python predicate written independently
    of the evaluator under test."""
    return st.one_of(
        st.just((All(), lambda lab: True)),
        KEYS.map(lambda k: (Has(k), lambda lab: k in lab)),
        st.tuples(KEYS, VALUES).map(lambda kv: (Eq(*kv), lambda lab: lab.get(kv[0]) == kv[1])),
        st.tuples(KEYS, VALUES).map(
            lambda kv: (Ne(*kv), lambda lab: not (kv[0] in lab and lab[kv[0]] == kv[1]))),
        st.tuples(KEYS, st.frozensets(VALUES)).map(
            lambda kv: (In(*kv), lambda lab: any(lab.get(kv[0]) == v for v in kv[1]))),
        st.tuples(KEYS, st.frozensets(VALUES)).map(
            lambda kv: (NotIn(*kv), lambda lab: all(lab.get(kv[0]) != v for v in kv[1]))),
    )


def _extend(children):
    return st.one_of(
        children.map(lambda c: (Not(c[0]), lambda lab: not c[1](lab))),
        st.tuples(children, children).map(
            lambda p: (And(p[0][0], p[1][0]), lambda lab: p[0][1](lab) and p[1][1](lab))),
        st.tuples(children, children).map(
            lambda p: (Or(p[0][0], p[1][0]), lambda lab: p[0][1](lab) or p[1][1](lab))),
    )


TREES = st.recursive(_leaf(), _extend, max_leaves=12)
LABELS = st.dictionaries(KEYS, VALUES, max_size=4)


@given(TREES)
@settings(max_examples=300)
def test_printing_then_parsing_gives_the_same_tree(pair):
    tree, _ = pair
    assert parse_selector(str(tree)) == tree


@given(TREES, LABELS)
@settings(max_examples=300)
def test_evaluation_agrees_with_a_reference_over_random_labels(pair, labels):
    tree, reference = pair
    assert parse_selector(str(tree)).matches(labels) is reference(labels)


@given(st.text(alphabet="ab'\"(){}!=&|, inotaslh", max_size=40))
@settings(max_examples=500)
def test_garbage_raises_only_the_parsers_one_line_error(text):
    try:
        parse_selector(text)
    except SelectorError as e:
        assert "\n" not in str(e)
