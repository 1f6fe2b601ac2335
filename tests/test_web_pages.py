"""The web pages in a real browser: Debian's headless chromium (selenium + chromium-driver) against a
real ``fishim up`` (tcp + ws + http listeners), the customer page's WebSocket through the
signal-loss proxy. The screenshot test refreshes docs/img/ (the README's) with FISHIM_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fishim.http.pages import MQTT_BUNDLE
from fishim.http.tokens import load_secret, make_token
from fishim.store import Store
from fishim.testing import free_port
from fishim.testing.proxy import Proxy
from tests._http_shop import HttpShop

pytestmark = pytest.mark.browser

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("Debian's chromium and chromium-driver are needed (scripts/test installs them as root)",
                allow_module_level=True)
if not MQTT_BUNDLE.is_file():
    pytest.skip("mqtt.js is not installed (scripts/web_setup.sh runs npm ci)", allow_module_level=True)

from selenium import webdriver  # noqa: E402  (only once chromium is known to be there)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Screenshots go to docs/img (the README shows them) when FISHIM_SCREENSHOTS=1, else to a temporary
# directory: an ordinary test run leaves the working tree as it was.
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
WAIT_S = 15
PNG = bytes.fromhex(  # a 2x2 teal PNG
    "89504e470d0a1a0a0000000d4948445200000002000000020802000000fdd49a73000000164944415478"
    "9c63e4f5eb6160f8cfc0c0c0c0c8c0000013b901a3c6a2b8d10000000049454e44ae426082")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--lang=en-US",
         # a synthetic microphone, allowed without a prompt: the voice-note test records from it
         "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


class Browser:
    """One headless chromium with its own fresh profile; closed (process and profile) by close()."""

    def __init__(self, width: int, height: int) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="fishim-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM or ""
        for flag in [*FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}"]:
            options.add_argument(flag)
        options.add_experimental_option("prefs", {"intl.accept_languages": "en-US,en"})
        self.driver: WebDriver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER or ""))

    def wait(self, condition: Any, timeout: float = WAIT_S, what: str = "") -> Any:
        return WebDriverWait(self.driver, timeout, poll_frequency=0.02).until(condition, what)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait_js(self, script: str, *args: Any, timeout: float = WAIT_S, what: str = "") -> Any:
        return self.wait(lambda d: d.execute_script(script, *args), timeout, what or script)

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HttpShop, Proxy]]:
    """A shop whose pages reach MQTT/WebSocket through a signal-loss proxy; orders o-1 and o-2 placed."""
    proxy_port = free_port()
    shop = HttpShop(tmp_path_factory.mktemp("web") / "shop.db",
                    config={"http": {"ws_url": f"ws://127.0.0.1:{proxy_port}/mqtt"}})
    proxy = Proxy("127.0.0.1", shop.ws_port, listen_port=proxy_port).start()
    try:
        shop.start()
        shop.place("o-1", "zhang")
        shop.place("o-2", "li")
        yield shop, proxy
    finally:
        proxy.close()
        shop.close()


@pytest.fixture(scope="module")
def customer(web: tuple[HttpShop, Proxy]) -> Iterator[Browser]:
    """The customer's phone on o-1's tracking page, live."""
    shop, _ = web
    with Browser(390, 844) as browser:
        browser.driver.get(shop.link("o-1")["url"])
        browser.wait_js("return document.body.dataset.conn === 'online'", what="tracking page online")
        yield browser


@pytest.fixture(scope="module")
def console(web: tuple[HttpShop, Proxy]) -> Iterator[Browser]:
    """The owner signed in on the console."""
    shop, _ = web
    with Browser(1280, 800) as browser:
        browser.driver.get(f"{shop.base}/console")
        browser.driver.find_element(By.ID, "login-user").send_keys("boss")
        browser.driver.find_element(By.ID, "login-pass").send_keys("pw-boss")
        browser.driver.find_element(By.ID, "login-btn").click()
        browser.wait_js("return document.body.dataset.conn === 'online'", what="console online")
        yield browser


def _open_order(console: Browser, order: str) -> None:
    """Click an order on the board (looked up and clicked in one step: the board redraws as events come)."""
    console.wait_js("const card = document.querySelector(`.order-card[data-order='${arguments[0]}']`);"
                    "if (card) card.click();"
                    "return !!card && document.getElementById('detail').dataset.order === arguments[0];",
                    order, what=f"{order} on the board, opened")


def _chat_ids(browser: Browser, list_id: str = "chat") -> list[str]:
    return browser.js(f"return [...document.querySelectorAll('#{list_id} > li')].map(li => li.dataset.id)")


def test_customer_page_shows_a_status_change_within_1s(web: tuple[HttpShop, Proxy], customer: Browser) -> None:
    shop, _ = web
    assert customer.driver.find_element(By.ID, "state").text == "Order placed"
    published_ms = time.time() * 1000
    status_id = shop.send("boss", "o-1", "status", retain=True, state="confirmed", eta="18:30")
    customer.wait_js("return document.getElementById('state').dataset.statusId === arguments[0]", status_id)
    rendered_ms = float(customer.js("return document.getElementById('state').dataset.renderedAt"))
    assert customer.driver.find_element(By.ID, "state").text == "Confirmed"
    assert rendered_ms - published_ms < 1000, f"shown {rendered_ms - published_ms:.0f} ms after its publish"
    print(f"status on the customer page {rendered_ms - published_ms:.0f} ms after its publish")
    timeline = customer.js("return [...document.querySelectorAll('#timeline li')].map(li => li.dataset.state)")
    assert timeline == ["confirmed", "placed"]


def test_console_chat_line_appears_on_customer_page(customer: Browser, console: Browser) -> None:
    _open_order(console, "o-1")
    console.driver.find_element(By.ID, "console-chat-input").send_keys("Your rod is packed, it leaves at 5pm")
    console.driver.find_element(By.ID, "console-send").click()
    customer.wait_js("return [...document.querySelectorAll('#chat li.theirs .text')]"
                     ".some(n => n.textContent === 'Your rod is packed, it leaves at 5pm')", what="the console's line")
    # the customer read it: the page sent a receipt the console's timeline shows
    console.wait_js("return [...document.querySelectorAll('#detail-timeline li[data-channel=receipts]')]"
                    ".some(li => li.textContent.includes('t-o-1'))", what="the customer's read receipt")


def test_photo_from_customer_page_shows_in_console(customer: Browser, console: Browser, tmp_path: Path) -> None:
    photo = tmp_path / "reel.png"
    photo.write_bytes(PNG)
    customer.js("document.getElementById('photo-input').hidden = false")
    customer.driver.find_element(By.ID, "photo-input").send_keys(str(photo))
    sha = customer.wait_js("const img = document.querySelector('#chat li.mine img.chat-photo.loaded');"
                           "return img && img.dataset.sha256", what="the photo on the customer page")
    console.wait_js("const img = document.querySelector(`#detail-chat img.chat-photo[data-sha256='${arguments[0]}']`);"
                    "return img && img.complete && img.naturalWidth === 2", sha, what="the photo in the console")


def test_voice_note_from_customer_page_plays_in_console(customer: Browser, console: Browser) -> None:
    customer.driver.find_element(By.ID, "voice-btn").click()
    customer.wait_js("return document.getElementById('voice-btn').classList.contains('recording')",
                     what="recording from the (fake) microphone")
    customer.driver.find_element(By.ID, "voice-btn").click()
    sha = customer.wait_js("const a = document.querySelector('#chat li.mine audio.chat-voice');"
                           "return a && a.src.startsWith('blob:') && a.dataset.sha256", what="the voice note sent")
    console.wait_js("const a = document.querySelector(`#detail-chat audio[data-sha256='${arguments[0]}']`);"
                    "return a && a.src.startsWith('blob:')", sha, what="the voice note in the console")


def test_console_signs_in_staff_and_owner_only(web: tuple[HttpShop, Proxy]) -> None:
    shop, _ = web
    with Browser(1024, 700) as browser:
        browser.driver.get(f"{shop.base}/console")
        for user, password, words in (("zhang", "pw-zhang", "Only staff and owner"), ("boss", "nope", "Wrong")):
            for field, value in (("login-user", user), ("login-pass", password)):
                box = browser.driver.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)
            browser.driver.find_element(By.ID, "login-btn").click()
            browser.wait_js("return document.getElementById('login-error').textContent.includes(arguments[0])", words,
                            what=f"the console's answer to {user}")
            assert browser.js("return document.querySelectorAll('.order-card').length") == 0


def test_signal_loss_then_every_missed_message_once_in_order(web: tuple[HttpShop, Proxy], customer: Browser) -> None:
    shop, proxy = web
    before = _chat_ids(customer)
    proxy.cut(refuse=True)
    customer.wait_js("return document.body.dataset.conn === 'offline'", what="page says offline")
    assert customer.driver.find_element(By.ID, "offline").is_displayed()
    sent = [shop.send("boss", "o-1", "chat", text=f"missed {i}") for i in range(50)]
    proxy.restore()
    customer.wait_js("return document.body.dataset.conn === 'online'", timeout=30, what="page back online")
    customer.wait_js("return document.querySelectorAll('#chat > li').length >= arguments[0]", len(before) + 50,
                     what="50 missed messages shown")
    shown = _chat_ids(customer)
    assert shown == before + sent  # every one, once, in order, after what was there
    texts = customer.js("return [...document.querySelectorAll('#chat li .text')].slice(-50).map(n => n.textContent)")
    assert texts == [f"missed {i}" for i in range(50)]
    assert not customer.driver.find_element(By.ID, "offline").is_displayed()


def test_expired_and_revoked_links_show_no_order_data(web: tuple[HttpShop, Proxy]) -> None:
    shop, _ = web
    shop.send("boss", "o-2", "status", retain=True, state="cancelled")
    expired = make_token(load_secret(shop.db), "o-1", -1)
    revoked = make_token(load_secret(shop.db), "o-2", 3600)
    with Browser(390, 844) as browser:
        for token, code in ((expired, "token_expired"), (revoked, "token_revoked")):
            browser.driver.get(f"{shop.base}/t/{token}")
            heading = browser.driver.find_element(By.ID, "refused")
            assert heading.get_attribute("data-code") == code
            source = browser.driver.page_source
            for secret in ("o-1", "o-2", "rod-3m", "zhang", "placed", "fishim-config", "mqtt"):
                assert secret not in source, f"{secret!r} on the {code} page"


def _demo_orders(shop: HttpShop) -> None:
    """A busy afternoon for the screenshots: every state, a late order, a waiting customer, a rider nearby.
    Times are spread over the last hour (the envelope's ``ts`` is the client's)."""
    items = [{"sku": "rod-3m", "qty": 1, "name": "Carbon rod 3 m"},
             {"sku": "reel-2500", "qty": 1, "name": "Spinning reel 2500"},
             {"sku": "line-pe2", "qty": 2, "name": "PE braid 2.0, 150 m"}]
    drop = {"lat": 30.2741, "lon": 120.1551}
    now = int(time.time() * 1000)

    def ago(minutes: float) -> int:
        return now - int(minutes * 60_000)

    shop.send("boss", "o-7", "status", retain=True, state="placed", customer="zhang", items=items, dropoff=drop,
              eta=now + 8 * 60_000, ts=ago(52))
    for minutes, state in ((49, "confirmed"), (41, "picking"), (34, "packed")):
        shop.send("boss", "o-7", "status", retain=True, state=state, ts=ago(minutes))
    shop.send("boss", "o-7", "status", retain=True, state="assigned", rider="rider7", note="Li Wei, e-bike", ts=ago(27))
    track = [(30.2828, 120.1419), (30.2812, 120.1447), (30.2796, 120.1470), (30.2781, 120.1492),
             (30.2770, 120.1510), (30.2757, 120.1528), (30.2749, 120.1541)]
    shop.send("rider7", "o-7", "status", retain=True, state="picked_up", note="on the way", ts=ago(16))
    for i, (lat, lon) in enumerate(track[:3]):
        shop.send("rider7", "o-7", "location", retain=True, lat=lat, lon=lon, accuracy_m=6, ts=ago(15 - i * 2))
    shop.send("rider7", "o-7", "status", retain=True, state="delivering", ts=ago(9))
    for i, (lat, lon) in enumerate(track[3:]):
        shop.send("rider7", "o-7", "location", retain=True, lat=lat, lon=lon, accuracy_m=5, ts=ago(8 - i * 2))
    shop.send("boss", "o-8", "status", retain=True, state="placed", customer="li",
              items=[{"sku": "lure-set", "qty": 1, "name": "Lure set"}], eta=ago(12), ts=ago(70))
    shop.send("boss", "o-8", "status", retain=True, state="confirmed", ts=ago(66))
    shop.send("li", "o-8", "chat", text="Is my order on its way?", ts=ago(6))
    shop.send("boss", "o-9", "status", retain=True, state="placed", customer="zhang",
              items=[{"sku": "hooks-8", "qty": 3, "name": "Hooks #8"}], ts=ago(3))
    shop.send("boss", "o-10", "status", retain=True, state="placed", customer="li",
              items=[{"sku": "net-2m", "qty": 1, "name": "Landing net 2 m"}], ts=ago(40))
    for minutes, state in ((38, "confirmed"), (30, "picking"), (22, "packed")):
        shop.send("boss", "o-10", "status", retain=True, state=state, ts=ago(minutes))


def test_screenshots_for_the_readme(web: tuple[HttpShop, Proxy], console: Browser, tmp_path: Path) -> None:
    shop, _ = web
    out = DOCS_IMG if os.environ.get("FISHIM_SCREENSHOTS") == "1" else tmp_path
    _demo_orders(shop)
    with Browser(390, 1400) as phone:
        phone.driver.get(shop.link("o-7")["url"])
        phone.wait_js("return document.body.dataset.conn === 'online' && document.getElementById('rider-dot')",
                      what="o-7's rider on the sketch")
        phone.driver.find_element(By.ID, "chat-input").send_keys("Please ring twice, the bell is broken")
        phone.driver.find_element(By.ID, "send-btn").click()
        _open_order(console, "o-7")
        console.driver.find_element(By.ID, "console-chat-input").send_keys("Sure! Rider is 2 minutes away")
        console.driver.find_element(By.ID, "console-send").click()
        phone.wait_js("return [...document.querySelectorAll('#chat .tick.read')].length > 0", what="read tick")
        assert phone.driver.find_element(By.ID, "arriving").is_displayed()  # 130 m from the drop-off, delivering
        assert "Spinning reel 2500" in phone.driver.find_element(By.ID, "items").text
        out.mkdir(parents=True, exist_ok=True)
        phone.js("window.scrollTo(0, 0)")
        phone.driver.save_screenshot(str(out / "tracking.png"))
        console.wait_js("return document.querySelector('[data-group=attention] [data-order=o-8]')",
                        what="the late order first")
        console.driver.save_screenshot(str(out / "console.png"))
        phone.driver.get(shop.link("o-7")["url"] + "?lang=zh")
        phone.wait_js("return document.getElementById('state').textContent === '配送中'", what="Chinese page")
    for name in ("tracking.png", "console.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _stored_order(shop: HttpShop, order: str, **expected: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        with Store(shop.db, readonly=True) as store:
            row = store.get_order(order)
        if row is not None and all(getattr(row, k) == v for k, v in expected.items()):
            return
        assert time.monotonic() < deadline, f"{order} is {row}, expected {expected}"
        time.sleep(0.05)


def test_console_assigns_a_rider_and_cancels(web: tuple[HttpShop, Proxy], console: Browser) -> None:
    shop, _ = web
    shop.send("boss", "o-11", "status", retain=True, state="placed", customer="li", items=[{"sku": "rod-3m"}])
    for state in ("confirmed", "picking", "packed"):
        shop.send("boss", "o-11", "status", retain=True, state=state)
    _open_order(console, "o-11")
    console.wait_js("return document.getElementById('detail-state').dataset.state === 'packed'")
    # the detail panel is redrawn as events arrive: fill and press in one step, retried until it is there
    console.wait_js("const i = document.getElementById('assign-input'), b = document.getElementById('assign-btn');"
                    "if (!i || !b) return false; i.value = arguments[0]; b.click(); return true;",
                    "rider7", what="assign form filled and pressed")
    _stored_order(shop, "o-11", state="assigned", rider="rider7")
    console.wait_js("return document.getElementById('detail-rider').textContent === 'rider7'", what="rider shown")
    console.wait_js("return [...document.querySelectorAll('.rider[data-rider=rider7] .orders')]"
                    ".some(n => n.textContent.includes('o-11'))", what="o-11 under rider7")
    console.driver.find_element(By.ID, "cancel-btn").click()
    console.driver.switch_to.alert.accept()
    _stored_order(shop, "o-11", state="cancelled")
    console.wait_js("return document.querySelector('[data-group=closed] [data-order=o-11]')", what="o-11 closed")
