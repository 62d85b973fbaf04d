// The account page's conveniences; every action works without them (plain forms).
"use strict";

// Copy buttons: <button data-copy="input-id">.
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const field = document.getElementById(button.dataset.copy);
  if (!field) return;
  navigator.clipboard.writeText(field.value).then(
    () => { button.textContent = "Copied"; },
    () => { field.select(); },
  );
});

// The overview's figures follow the wallet (a top-up landing, requests finishing) every 2 s.
// Back from Checkout (?session_id=…), the banner turns to "credited" when the webhook has landed.
const figures = document.querySelector("[data-balance-url]");
if (figures) {
  const topup = document.querySelector("#topup[data-state=pending]");
  const url = topup
    ? figures.dataset.balanceUrl + "?session_id=" + encodeURIComponent(topup.dataset.sessionId)
    : figures.dataset.balanceUrl;
  const refresh = async () => {
    try {
      const response = await fetch(url, { credentials: "same-origin" });
      if (!response.ok) return;
      const wallet = await response.json();
      if (topup && wallet.topup_credited && topup.dataset.state === "pending") {
        topup.dataset.state = "credited";
        topup.querySelector("p").textContent = "Payment received: credited to your wallet.";
      }
      document.getElementById("balance").textContent = wallet.balance_usd;
      document.getElementById("reserved").textContent = wallet.reserved_usd;
      document.getElementById("available").textContent = wallet.available_usd;
      document.getElementById("state").textContent = wallet.state;
    } catch (_) { /* offline for a moment: the next tick tries again */ }
  };
  setInterval(refresh, 2000);
}
