import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tortie.datastore import selector as sel
from tortie.errors import ValidationError

LABELS = {"role": "web", "tier": "front-end", "example.com/zone": "z1"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", True),
        ("all()", True),
        ("role == 'web'", True),
        ('role == "db"', False),
        ("role != 'db'", True),
        ("missing != 'x'", True),  # negative tests match objects without the label
        ("has(role)", True),
        ("!has(missing)", True),
        ("has(missing)", False),
        ("role in {'db', 'web'}", True),
        ("role in {}", False),
        ("role not in {'web'}", False),
        ("missing not in {'web'}", True),
        ("missing in {'web'}", False),
        ("tier contains 'end'", True),
        ("tier starts with 'front'", True),
        ("tier ends with 'front'", False),
        ("missing contains ''", False),
        ("example.com/zone == 'z1'", True),
        ("role == 'web' && tier == 'back'", False),
        ("role == 'web' || tier == 'back'", True),
        ("role == 'db' || tier == 'back' && has(role)", False),
        ("!(role == 'db' || tier == 'back') && has(role)", True),
        ("(role == 'db' || tier starts   with 'front') && !!has(role)", True),
    ],
)
def test_semantics(text, expected):
    assert sel.parse(text).matches(LABELS) is expected


def test_and_binds_tighter_than_or():
    s = sel.parse("a == '1' || b == '1' && c == '1'")
    assert s.matches({"a": "1"})  # a || (b && c), not (a || b) && c
    assert not s.matches({"b": "1"})


@pytest.mark.parametrize(
    "bad",
    ["role ==", "role = 'x'", "== 'x'", "role in {'a' 'b'}", "(role == 'x'", "role == 'x')",
     "role == 'x' &&", "has()", "role == \"x'", "role ~ 'x'", "in == 'x'", "all() all()"],
)
def test_syntax_errors_say_where(bad):
    with pytest.raises(ValidationError, match="selector"):
        sel.parse(bad)


def test_validate_names_the_field():
    with pytest.raises(ValidationError) as err:
        sel.validate("role ==", field="spec.nodeSelector")
    assert str(err.value).startswith("spec.nodeSelector: ")
    assert sel.validate(None, field="x") == ""


def test_from_k8s():
    s = sel.from_k8s({
        "matchLabels": {"role": "web"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["front-end", "x"]},
            {"key": "gone", "operator": "DoesNotExist"},
            {"key": "env", "operator": "NotIn", "values": ["prod"]},
        ],
    })
    assert s.matches(LABELS)
    assert not s.matches({**LABELS, "gone": ""})
    assert not s.matches({**LABELS, "env": "prod"})
    assert str(s) == ("role == \"web\" && tier in {\"front-end\", \"x\"} && !has(gone) "
                      "&& env not in {\"prod\"}")
    assert sel.from_k8s({}).matches({}) and sel.from_k8s(None).matches({"a": "b"})


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"matchExpressions": [{"key": "a", "operator": "Foo"}]}, "podSelector.matchExpressions[0].operator"),
        ({"matchExpressions": [{"key": "a", "operator": "In"}]}, "podSelector.matchExpressions[0].values"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
         "podSelector.matchExpressions[0].values"),
        ({"matchLabel": {}}, "podSelector"),
    ],
)
def test_from_k8s_errors_name_the_field(bad, field):
    with pytest.raises(ValidationError) as err:
        sel.from_k8s(bad, field="podSelector")
    assert err.value.field == field


# --- properties: printing is canonical and keeps the meaning ---------------------------

keys = st.sampled_from(["a", "b", "example.com/c", "d_1"])
values = st.text(alphabet="xyz-'. ", max_size=3)
atoms = st.one_of(
    st.just(sel.All()),
    keys.map(sel.Has),
    st.builds(sel.Equals, keys, values),
    st.builds(sel.In, keys, st.frozensets(values, max_size=3)),
    st.builds(sel.Match, keys, st.sampled_from(["contains", "starts with", "ends with"]), values),
)
trees = st.recursive(
    atoms,
    lambda inner: st.one_of(
        inner.map(sel.Not),
        st.lists(inner, min_size=2, max_size=3).map(lambda p: sel.And(tuple(p))),
        st.lists(inner, min_size=2, max_size=3).map(lambda p: sel.Or(tuple(p))),
    ),
    max_leaves=8,
)
label_sets = st.dictionaries(keys, values, max_size=4)


@settings(max_examples=300, deadline=None)
@given(trees, st.lists(label_sets, min_size=1, max_size=5))
def test_print_parse_round_trip(tree, samples):
    text = str(tree)
    parsed = sel.parse(text)
    assert str(sel.parse(str(parsed))) == str(parsed)  # canonical: printing is a fixed point
    for labels in samples:
        assert parsed.matches(labels) == tree.matches(labels), (text, labels)


@pytest.mark.parametrize(
    ("k8s", "labels", "expected"),
    [
        ("env=prod", {"env": "prod"}, True),
        ("env==prod,zone in (a, b)", {"env": "prod", "zone": "b"}, True),
        ("env==prod,zone in (a, b)", {"env": "prod", "zone": "c"}, False),
        ("env!=prod", {}, True),  # as in Kubernetes: a missing label is "not equal"
        ("zone notin (a)", {"zone": "a"}, False),
        ("gpu", {"gpu": ""}, True),
        ("!gpu", {"gpu": "x"}, False),
        ("example.com/rack=r1,!legacy", {"example.com/rack": "r1"}, True),
    ],
)
def test_kubernetes_label_selector_syntax(k8s, labels, expected):
    assert sel.parse(k8s).matches(labels) is expected


def test_kubernetes_syntax_means_the_same_as_calico_syntax():
    assert sel.parse("env=prod,zone in (a,b),!legacy") == sel.parse(
        'env == "prod" && zone in {"a", "b"} && !has(legacy)')
