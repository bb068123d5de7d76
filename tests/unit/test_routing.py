"""Routing rules: regex matches on header attributes, exclusions, and the loop guard."""

from dicom_node.config import RouteRule
from dicom_node.routing import decide

BR40 = RouteRule(
    name="br40",
    engine="linear",
    destinations=("pacs",),
    match=(("Modality", "^CT$"), ("ConvolutionKernel", "^Br40")),
    exclude=(("ImageType", "LOCALIZER"),),
)
CT_HEADER = {
    "Modality": "CT",
    "ConvolutionKernel": "Br40d\\3",
    "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
}


def test_br40_ct_series_matches_the_rule():
    d = decide(CT_HEADER, [BR40], own_output=False)
    assert d.rule is BR40
    assert "br40" in d.reason


def test_other_kernel_does_not_match():
    d = decide({**CT_HEADER, "ConvolutionKernel": "Bl64d"}, [BR40], own_output=False)
    assert d.rule is None
    assert d.reason == "no rule matched"


def test_localizer_is_excluded():
    d = decide({**CT_HEADER, "ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER"}, [BR40], own_output=False)
    assert d.rule is None


def test_missing_attribute_matches_as_empty_string():
    assert decide({"Modality": "CT"}, [BR40], own_output=False).rule is None


def test_loop_guard_wins_over_matching_rules():
    d = decide(CT_HEADER, [BR40], own_output=True)
    assert d.rule is None
    assert "loop guard" in d.reason


def test_first_matching_rule_wins():
    any_ct = RouteRule("any-ct", "linear", (), (("Modality", "CT"),))
    assert decide(CT_HEADER, [any_ct, BR40], own_output=False).rule is any_ct


def test_no_match_records_why_each_rule_missed_and_the_reason_keeps_values_out_of_the_log():
    any_sharp = RouteRule("sharp", "linear", (), (("ConvolutionKernel", "^Bl"), ("Modality", "MR")))
    header = {**CT_HEADER, "ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER"}
    d = decide(header, [BR40, any_sharp], own_output=False)
    assert d.rule is None and d.reason == "no rule matched", "the node logs the short reason"
    assert [m.describe() for m in d.misses] == [
        "ImageType 'ORIGINAL\\PRIMARY\\LOCALIZER' matches the exclusion LOCALIZER",
        "ConvolutionKernel 'Br40d\\3' does not match ^Bl",
        "Modality 'CT' does not match MR",
    ]
    assert [m.rule for m in d.misses] == ["br40", "sharp", "sharp"]
    assert decide(CT_HEADER, [BR40], own_output=False).misses == ()
    assert decide(CT_HEADER, [BR40], own_output=True).misses == ()
