"""End to end in a real browser (Debian's headless Chromium through Selenium, nothing downloaded): an annotator
rates with the keyboard and resumes after a reload, a visitor chats with a tiny checkpoint, and the report gives
the expected means and Fleiss' κ. Screenshots go to the test's temporary folder."""

from pathlib import Path

import httpx
import pytest

from conftest import skip_unless_ci
from vikdf.web.chat import ChatArguments, build_chat_app
from vikdf.web.human_eval import build_report, create_annotation_app, create_study
from vikdf.web.human_eval.study import CRITERION_KEYS
from web_helpers import (
    RESPONSES,
    assignments,
    EXPECTED_KAPPA,
    EXPECTED_KAPPA_PER_CRITERION,
    EXPECTED_MEANS,
    SYSTEMS,
    design_scores,
    running_server,
    write_predictions,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=900,1000")


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium; skipped where it is not installed, except in CI, where that is a failure."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        message = f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)"
        skip_unless_ci(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager is not run, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=120):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(condition)


def text_of(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def rate_with_keys(driver, annotator, rated_before):
    """Rate the item on screen as DESIGN says, with the keys 1-5 and Enter, and wait for the next page; returns
    the response shown."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    assert text_of(driver, "progress").startswith(f"{rated_before} / 4 rated")
    from selenium.webdriver.common.by import By

    shown = text_of(driver, "response")
    assert driver.find_elements(By.CSS_SELECTOR, "#response *") == []  # markup in a response stays text
    scores = design_scores(shown, annotator)
    keys = ActionChains(driver)
    for key in CRITERION_KEYS:
        keys.send_keys(str(scores[key]))
    keys.send_keys(Keys.ENTER).perform()
    wait_for(driver, lambda d: text_of(d, "progress").startswith(f"{rated_before + 1} / 4 rated"))
    return shown


def visible(text):
    """Text without control characters (which the tiny random model writes and browsers treat unevenly) and with
    runs of white space as one space, as a browser lays it out."""
    return " ".join("".join(ch for ch in text if ch.isprintable() or ch.isspace()).split())


def test_annotate_with_the_keyboard_resume_chat_and_report(browser, build_tiny, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    db = tmp_path / "study.sqlite"
    tokens = create_study(db, write_predictions(tmp_path), list(SYSTEMS), sample=2, seed=0, annotators=3)
    with running_server(create_annotation_app(db)) as url:
        browser.get(f"{url}/a/{tokens[0]}")
        shown = [rate_with_keys(browser, 1, rated) for rated in range(3)]
        browser.refresh()
        assert text_of(browser, "progress") == "3 / 4 rated · item 4 of 4"
        browser.save_screenshot(str(tmp_path / "annotation.png"))
        shown.append(rate_with_keys(browser, 1, 3))
        assert sorted(shown) == sorted(RESPONSES.values())  # the <script> response among them, shown as text
        assert "every item is rated" in browser.page_source
        for number, token in enumerate(tokens[1:], 2):
            for item, text, _ in assignments(db, token):
                response = httpx.post(f"{url}/a/{token}/rate", data={"item": item, **design_scores(text, number)})
                assert response.status_code == 303

    model, processor = build_tiny("llama")
    model.save_pretrained(tmp_path / "tiny-vikdf")
    processor.save_pretrained(tmp_path / "tiny-vikdf")
    app, responder = build_chat_app(ChatArguments(model=str(tmp_path / "tiny-vikdf")))
    try:
        with running_server(app) as url:
            browser.get(url)
            message = "the sky is so vast tonight, i wonder what is out there."
            browser.find_element(By.ID, "message").send_keys(message + Keys.ENTER)
            shown = wait_for(browser, lambda d: {key: text_of(d, key) for key in ("response", "knowledge", "llm-response")})
            browser.save_screenshot(str(tmp_path / "chat.png"))
        expected = responder.answer([[message]])[0]
    finally:
        responder.close()
    assert {key: visible(text) for key, text in shown.items()} == {
        "response": visible(expected.response), "knowledge": visible(expected.knowledge),
        "llm-response": visible(expected.llm_response),
    }
    assert shown["response"]
    assert message in browser.page_source

    summary = build_report(db, tmp_path / "report")
    for row in summary["systems"]:
        for key in CRITERION_KEYS:
            assert row[key] == pytest.approx(EXPECTED_MEANS[row["system"]][key])
        assert row["kappa"] == pytest.approx(EXPECTED_KAPPA[row["system"]])
    assert summary["kappa_per_criterion"] == pytest.approx(EXPECTED_KAPPA_PER_CRITERION)
    for name in ("annotation.png", "chat.png"):
        assert (tmp_path / name).stat().st_size > 10_000
