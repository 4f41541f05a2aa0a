//! The Tessera token on NEAR.
//!
//! - **Balances**: a NEP-141 fungible token (with NEP-145 storage and NEP-148 metadata, from
//!   `near-contract-standards`). The hub's account (the owner) mints what the run's ledger
//!   records: each `Allocation` at initialisation, each round's `Receipt` units with
//!   [`Contract::mint_rewards`]. Holders may transfer freely.
//! - **Roots**: [`Contract::record_root`] keeps each signed Merkle root of the ledger (its size
//!   and hex root), so anyone can check a ledger inclusion proof against the chain.
//! - **Governance outcomes**: [`Contract::record_outcome`] keeps the hash of each closed vote's
//!   outcome entry in the ledger with the recorded root that commits it, so a steered run's
//!   decisions are anchored on chain with the ledger they belong to.
//! - **Payouts**: [`Contract::distribute_epoch`] takes an epoch's revenue as its attached
//!   deposit, keeps the funding share for the run's funding account, and splits the rest over
//!   the token's balances by the largest-remainder method ([`split_pro_rata`], the same rule the
//!   ledger verifier enforces); holders withdraw with [`Contract::claim`].
//!
//! Amounts are yoctoNEAR (`u128`); a share is computed in 256 bits, so no product overflows.

use near_contract_standards::fungible_token::events::FtMint;
use near_contract_standards::fungible_token::metadata::{
    FT_METADATA_SPEC, FungibleTokenMetadata, FungibleTokenMetadataProvider,
};
use near_contract_standards::fungible_token::{FungibleToken, FungibleTokenCore, FungibleTokenResolver};
use near_contract_standards::storage_management::{StorageBalance, StorageBalanceBounds, StorageManagement};
use near_sdk::json_types::U128;
use near_sdk::store::{IterableSet, LookupMap, Vector};
use near_sdk::{AccountId, BorshStorageKey, NearToken, PanicOnDefault, Promise, PromiseOrValue, env, near, require};

/// 256-bit unsigned integers, for `amount × balance` products (the macro's own code trips a
/// clippy lint it cannot be told about from outside).
#[allow(clippy::manual_div_ceil)]
mod wide {
    uint::construct_uint! {
        pub struct U256(4);
    }
}
use wide::U256;

#[near(serializers = [borsh])]
#[derive(BorshStorageKey)]
enum Key {
    Token,
    Holders,
    Roots,
    Epochs,
    Claimable,
    Outcomes,
    OutcomeIndex,
}

/// A signed Merkle root of the run's ledger: the first `size` entries hash to `root`.
#[near(serializers = [borsh, json])]
#[derive(Clone, Debug, PartialEq)]
pub struct Root {
    pub size: u64,
    /// 64 hex digits (RFC 6962, SHA-256).
    pub root: String,
    pub round: u64,
}

/// A closed vote of a steered run: the BLAKE3 of its outcome entry's bytes, whether it passed,
/// and the recorded ledger root that commits that entry.
#[near(serializers = [borsh, json])]
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The proposal's id (64 hex digits).
    pub proposal: String,
    /// BLAKE3 of the outcome entry (64 hex digits).
    pub hash: String,
    pub passed: bool,
    /// The root (as recorded by [`Contract::record_root`]) whose ledger holds the entry.
    pub size: u64,
    pub root: String,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// What distributing an epoch fixed.
#[near(serializers = [borsh, json])]
#[derive(Clone, Debug, PartialEq)]
pub struct Epoch {
    pub revenue: U128,
    pub funding_ppm: u32,
    pub funding: U128,
    pub payable: U128,
    /// Holders paid, and the balances' total at that moment.
    pub holders: u32,
    pub balance_total: U128,
}

#[near(contract_state)]
#[derive(PanicOnDefault)]
pub struct Contract {
    token: FungibleToken,
    metadata: FungibleTokenMetadata,
    /// The hub's account: mints rewards, records roots, distributes epochs.
    owner: AccountId,
    /// Receives each epoch's funding share.
    funding_account: AccountId,
    /// Every account that ever held tokens (a zero balance is paid nothing).
    holders: IterableSet<AccountId>,
    roots: Vector<Root>,
    epochs: LookupMap<u64, Epoch>,
    last_epoch: Option<u64>,
    claimable: LookupMap<AccountId, u128>,
    outcomes: Vector<Outcome>,
    /// Each recorded proposal's index in `outcomes`.
    outcome_index: LookupMap<String, u32>,
}

/// `amount` split pro rata to `balances` by the largest-remainder method: each gets the floor of
/// its exact share, the units left over go one each to the largest remainders (ties to the
/// account that sorts first). The parts sum to `amount` exactly; zero parts are left out.
pub fn split_pro_rata(amount: u128, balances: &[(AccountId, u128)]) -> Vec<(AccountId, u128)> {
    tessera_split::pro_rata(amount, balances.iter().cloned())
}

#[near]
impl Contract {
    /// Creates the token with the run's allocations (the ledger's `Allocation` entries).
    #[init]
    pub fn new(
        owner: AccountId,
        funding_account: AccountId,
        allocations: Vec<(AccountId, U128)>,
        symbol: String,
    ) -> Self {
        let metadata = FungibleTokenMetadata {
            spec: FT_METADATA_SPEC.to_string(),
            name: "Tessera".to_string(),
            symbol,
            icon: None,
            reference: None,
            reference_hash: None,
            decimals: 6,
        };
        metadata.assert_valid();
        let mut this = Contract {
            token: FungibleToken::new(Key::Token),
            metadata,
            owner,
            funding_account,
            holders: IterableSet::new(Key::Holders),
            roots: Vector::new(Key::Roots),
            epochs: LookupMap::new(Key::Epochs),
            last_epoch: None,
            claimable: LookupMap::new(Key::Claimable),
            outcomes: Vector::new(Key::Outcomes),
            outcome_index: LookupMap::new(Key::OutcomeIndex),
        };
        this.mint(&allocations, "allocation");
        this
    }

    fn assert_owner(&self) {
        require!(env::predecessor_account_id() == self.owner, "only the hub's account may do this");
    }

    fn mint(&mut self, amounts: &[(AccountId, U128)], memo: &str) {
        for (account, amount) in amounts {
            require!(amount.0 > 0, "a mint must be positive");
            if !self.token.accounts.contains_key(account) {
                self.token.internal_register_account(account);
            }
            self.token.internal_deposit(account, amount.0);
            self.holders.insert(account.clone());
            FtMint { owner_id: account, amount: *amount, memo: Some(memo) }.emit();
        }
    }

    /// Mints a settled round's reward units (the ledger's receipts for `round`).
    pub fn mint_rewards(&mut self, round: u64, rewards: Vec<(AccountId, U128)>) {
        self.assert_owner();
        self.mint(&rewards, &format!("round {round}"));
    }

    /// Records a signed root of the ledger; sizes only grow.
    pub fn record_root(&mut self, size: u64, root: String, round: u64) {
        self.assert_owner();
        require!(root.len() == 64 && root.bytes().all(|c| c.is_ascii_hexdigit()), "a root is 64 hex digits");
        if let Some(last) = self.roots.len().checked_sub(1).and_then(|i| self.roots.get(i)) {
            require!(size > last.size, "a root must cover more of the ledger than the last one");
        }
        self.roots.push(Root { size, root: root.to_ascii_lowercase(), round });
    }

    /// Records a closed vote's outcome entry (its hash) with the recorded root `(size, root)` that
    /// commits it. Once per proposal; the root must be one recorded here (found by size, which
    /// only grows: O(log roots)).
    pub fn record_outcome(&mut self, proposal: String, hash: String, passed: bool, size: u64, root: String) {
        self.assert_owner();
        require!(is_hex64(&proposal) && is_hex64(&hash), "a proposal id and an outcome hash are 64 hex digits each");
        let proposal = proposal.to_ascii_lowercase();
        require!(!self.outcome_index.contains_key(&proposal), "this proposal's outcome is recorded already");
        let (mut lo, mut hi) = (0u32, self.roots.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.roots.get(mid).map(|r| r.size) {
                Some(s) if s < size => lo = mid + 1,
                _ => hi = mid,
            }
        }
        let root = root.to_ascii_lowercase();
        let known = self.roots.get(lo).is_some_and(|r| r.size == size && r.root == root);
        require!(known, "the outcome must be committed by a root recorded here");
        self.outcome_index.insert(proposal.clone(), self.outcomes.len());
        self.outcomes.push(Outcome { proposal, hash: hash.to_ascii_lowercase(), passed, size, root });
    }

    pub fn outcome(&self, proposal: String) -> Option<Outcome> {
        let i = *self.outcome_index.get(&proposal.to_ascii_lowercase())?;
        self.outcomes.get(i).cloned()
    }

    pub fn outcomes(&self, from: u32, limit: u32) -> Vec<Outcome> {
        (from..self.outcomes.len().min(from.saturating_add(limit)))
            .filter_map(|i| self.outcomes.get(i).cloned())
            .collect()
    }

    /// Distributes an epoch's revenue, attached as the deposit: `funding_ppm` parts per million
    /// (rounded down) go to the funding account, the rest pro rata to token balances. Epochs
    /// only increase. Returns what was fixed.
    #[payable]
    pub fn distribute_epoch(&mut self, epoch: u64, funding_ppm: u32) -> Epoch {
        self.assert_owner();
        require!(funding_ppm <= 1_000_000, "funding_ppm is at most 10⁶");
        require!(self.last_epoch.is_none_or(|l| epoch > l), "epochs are distributed in increasing order, once");
        let revenue = env::attached_deposit().as_yoctonear();
        let balances: Vec<(AccountId, u128)> = self
            .holders
            .iter()
            .map(|a| (a.clone(), self.token.ft_balance_of(a.clone()).0))
            .filter(|(_, b)| *b > 0)
            .collect();
        let balance_total: u128 = balances.iter().map(|(_, b)| *b).sum();
        let funding = if balance_total == 0 {
            revenue
        } else {
            (U256::from(revenue) * U256::from(funding_ppm) / U256::from(1_000_000u32)).as_u128()
        };
        let payable = revenue - funding;
        let parts = split_pro_rata(payable, &balances);
        for (account, amount) in &parts {
            *self.claimable.entry(account.clone()).or_insert(0) += amount;
        }
        if funding > 0 {
            *self.claimable.entry(self.funding_account.clone()).or_insert(0) += funding;
        }
        let record = Epoch {
            revenue: U128(revenue),
            funding_ppm,
            funding: U128(funding),
            payable: U128(payable),
            holders: parts.len() as u32,
            balance_total: U128(balance_total),
        };
        self.epochs.insert(epoch, record.clone());
        self.last_epoch = Some(epoch);
        record
    }

    /// Withdraws everything paid out to the caller so far.
    pub fn claim(&mut self) -> Promise {
        let account = env::predecessor_account_id();
        let amount = self.claimable.remove(&account).unwrap_or(0);
        require!(amount > 0, "nothing to claim");
        Promise::new(account).transfer(NearToken::from_yoctonear(amount))
    }

    pub fn claimable_of(&self, account_id: AccountId) -> U128 {
        U128(self.claimable.get(&account_id).copied().unwrap_or(0))
    }

    pub fn epoch(&self, epoch: u64) -> Option<Epoch> {
        self.epochs.get(&epoch).cloned()
    }

    pub fn latest_root(&self) -> Option<Root> {
        self.roots.len().checked_sub(1).and_then(|i| self.roots.get(i)).cloned()
    }

    pub fn roots(&self, from: u32, limit: u32) -> Vec<Root> {
        (from..self.roots.len().min(from.saturating_add(limit))).filter_map(|i| self.roots.get(i).cloned()).collect()
    }

    pub fn owner(&self) -> AccountId {
        self.owner.clone()
    }
}

#[near]
impl FungibleTokenCore for Contract {
    #[payable]
    fn ft_transfer(&mut self, receiver_id: AccountId, amount: U128, memo: Option<String>) {
        self.token.ft_transfer(receiver_id.clone(), amount, memo);
        self.holders.insert(receiver_id);
    }

    #[payable]
    fn ft_transfer_call(
        &mut self,
        receiver_id: AccountId,
        amount: U128,
        memo: Option<String>,
        msg: String,
    ) -> PromiseOrValue<U128> {
        self.holders.insert(receiver_id.clone());
        self.token.ft_transfer_call(receiver_id, amount, memo, msg)
    }

    fn ft_total_supply(&self) -> U128 {
        self.token.ft_total_supply()
    }

    fn ft_balance_of(&self, account_id: AccountId) -> U128 {
        self.token.ft_balance_of(account_id)
    }
}

#[near]
impl FungibleTokenResolver for Contract {
    #[private]
    fn ft_resolve_transfer(&mut self, sender_id: AccountId, receiver_id: AccountId, amount: U128) -> U128 {
        let (used, _burned) = self.token.internal_ft_resolve_transfer(&sender_id, receiver_id, amount);
        used.into()
    }
}

#[near]
impl StorageManagement for Contract {
    #[payable]
    fn storage_deposit(&mut self, account_id: Option<AccountId>, registration_only: Option<bool>) -> StorageBalance {
        self.token.storage_deposit(account_id, registration_only)
    }

    #[payable]
    fn storage_withdraw(&mut self, amount: Option<NearToken>) -> StorageBalance {
        self.token.storage_withdraw(amount)
    }

    #[payable]
    fn storage_unregister(&mut self, force: Option<bool>) -> bool {
        self.token.internal_storage_unregister(force).is_some()
    }

    fn storage_balance_bounds(&self) -> StorageBalanceBounds {
        self.token.storage_balance_bounds()
    }

    fn storage_balance_of(&self, account_id: AccountId) -> Option<StorageBalance> {
        self.token.storage_balance_of(account_id)
    }
}

#[near]
impl FungibleTokenMetadataProvider for Contract {
    fn ft_metadata(&self) -> FungibleTokenMetadata {
        self.metadata.clone()
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use near_sdk::test_utils::VMContextBuilder;
    use near_sdk::testing_env;

    use super::*;

    fn acct(name: &str) -> AccountId {
        name.parse().unwrap()
    }

    fn context(caller: &str, deposit: u128) -> VMContextBuilder {
        let mut b = VMContextBuilder::new();
        b.current_account_id(acct("token.near"))
            .predecessor_account_id(acct(caller))
            .signer_account_id(acct(caller))
            .attached_deposit(NearToken::from_yoctonear(deposit));
        b
    }

    /// The ledger test's world: a backer's 2000, contributors' 1201, 601 and 201 units.
    fn world() -> Contract {
        testing_env!(context("hub.near", 0).build());
        let mut c =
            Contract::new(acct("hub.near"), acct("fund.near"), vec![(acct("backer.near"), U128(2000))], "TSR".into());
        c.mint_rewards(
            0,
            vec![(acct("c0.near"), U128(1201)), (acct("c1.near"), U128(601)), (acct("c2.near"), U128(201))],
        );
        c
    }

    #[test]
    fn allocations_and_rewards_are_minted_by_the_hub_only() {
        let c = world();
        assert_eq!(c.ft_total_supply().0, 4003);
        assert_eq!(c.ft_balance_of(acct("backer.near")).0, 2000);
        assert_eq!(c.ft_metadata().symbol, "TSR");
    }

    #[test]
    #[should_panic(expected = "only the hub's account")]
    fn others_cannot_mint() {
        let mut c = world();
        testing_env!(context("mallory.near", 0).build());
        c.mint_rewards(1, vec![(acct("mallory.near"), U128(1_000_000))]);
    }

    /// The same numbers as the ledger's own test: 500 of revenue, 20% funding, 400 split
    /// 200 / 120 / 60 / 20 — the contract and the ledger agree.
    #[test]
    fn an_epoch_is_split_exactly_as_the_ledger_splits_it() {
        let mut c = world();
        testing_env!(context("hub.near", 500).build());
        let e = c.distribute_epoch(0, 200_000);
        assert_eq!((e.revenue.0, e.funding.0, e.payable.0, e.balance_total.0), (500, 100, 400, 4003));
        for (who, amount) in
            [("backer.near", 200), ("c0.near", 120), ("c1.near", 60), ("c2.near", 20), ("fund.near", 100)]
        {
            assert_eq!(c.claimable_of(acct(who)).0, amount, "{who}");
        }
        assert_eq!(c.epoch(0), Some(e));
        testing_env!(context("c0.near", 0).build());
        let _ = c.claim();
        assert_eq!(c.claimable_of(acct("c0.near")).0, 0);
    }

    #[test]
    #[should_panic(expected = "increasing order")]
    fn an_epoch_is_distributed_once() {
        let mut c = world();
        testing_env!(context("hub.near", 10).build());
        c.distribute_epoch(3, 0);
        c.distribute_epoch(3, 0);
    }

    #[test]
    #[should_panic(expected = "nothing to claim")]
    fn claiming_nothing_is_refused() {
        let mut c = world();
        testing_env!(context("c1.near", 0).build());
        let _ = c.claim();
    }

    #[test]
    fn a_transfer_moves_future_payouts_with_the_tokens() {
        let mut c = world();
        testing_env!(context("newcomer.near", c.storage_balance_bounds().min.as_yoctonear()).build());
        c.storage_deposit(None, None);
        testing_env!(context("backer.near", 1).build());
        c.ft_transfer(acct("newcomer.near"), U128(1000), None);
        testing_env!(context("hub.near", 4003).build());
        c.distribute_epoch(1, 0);
        assert_eq!(c.claimable_of(acct("newcomer.near")).0, 1000);
        assert_eq!(c.claimable_of(acct("backer.near")).0, 1000);
    }

    #[test]
    fn roots_only_grow_and_are_kept() {
        let mut c = world();
        testing_env!(context("hub.near", 0).build());
        c.record_root(16, "ab".repeat(32), 1);
        c.record_root(20, "CD".repeat(32), 2);
        assert_eq!(c.latest_root().unwrap().root, "cd".repeat(32));
        assert_eq!(c.roots(0, 10).len(), 2);
        let stale = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.record_root(20, "ef".repeat(32), 3)));
        assert!(stale.is_err());
        let bad = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.record_root(30, "xyz".into(), 3)));
        assert!(bad.is_err());
    }

    #[test]
    fn outcomes_are_recorded_once_with_a_recorded_root() {
        let mut c = world();
        testing_env!(context("hub.near", 0).build());
        c.record_root(16, "ab".repeat(32), 1);
        c.record_root(24, "cd".repeat(32), 2);
        let (p, h) = ("01".repeat(32), "EF".repeat(32));
        c.record_outcome(p.clone(), h.clone(), true, 24, "CD".repeat(32));
        let o = c.outcome(p.clone()).unwrap();
        assert_eq!((o.hash, o.passed, o.size, o.root), ("ef".repeat(32), true, 24, "cd".repeat(32)));
        assert_eq!(c.outcomes(0, 10).len(), 1);
        let refused = |c: &mut Contract, p: String, size: u64, root: String| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                c.record_outcome(p, "ef".repeat(32), false, size, root)
            }))
            .is_err()
        };
        assert!(refused(&mut c, p.clone(), 24, "cd".repeat(32)), "twice");
        assert!(refused(&mut c, "02".repeat(32), 20, "cd".repeat(32)), "a size no root has");
        assert!(refused(&mut c, "02".repeat(32), 16, "cd".repeat(32)), "another root's hash");
        assert!(refused(&mut c, "xyz".into(), 16, "ab".repeat(32)), "not hex");
        c.record_outcome("02".repeat(32), h, false, 16, "ab".repeat(32));
        testing_env!(context("mallory.near", 0).build());
        assert!(refused(&mut c, "03".repeat(32), 16, "ab".repeat(32)), "not the owner");
    }

    /// On pseudo-random balances: exact sum, each part within one unit of its share, and a
    /// larger balance never gets less; huge amounts do not overflow.
    #[test]
    fn the_split_is_exact_on_many_inputs() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..500 {
            let n = (next() % 9) as usize;
            let balances: Vec<(AccountId, u128)> = (0..n)
                .map(|i| {
                    (
                        acct(&format!("h{i}.near")),
                        if case % 3 == 0 { u128::from(next()) << 60 } else { u128::from(next() % 1000) },
                    )
                })
                .collect();
            let amount = if case % 2 == 0 { u128::MAX - u128::from(next()) } else { u128::from(next() % 10_000) };
            let parts = split_pro_rata(amount, &balances);
            let total: u128 = balances.iter().map(|b| b.1).sum();
            if total == 0 {
                assert!(parts.is_empty());
                continue;
            }
            assert_eq!(parts.iter().map(|p| p.1).sum::<u128>(), amount, "case {case}");
            let got = |a: &AccountId| parts.iter().find(|p| &p.0 == a).map_or(0, |p| p.1);
            for (a, b) in &balances {
                let exact = U256::from(amount) * U256::from(*b) / U256::from(total);
                let g = U256::from(got(a));
                assert!(g == exact || g == exact + U256::one(), "case {case}: {a}");
                for (a2, b2) in &balances {
                    if b > b2 {
                        assert!(got(a) >= got(a2));
                    }
                }
            }
        }
    }

    proptest::proptest! {
        /// The contract pays an epoch out by the very split the ledger verifies
        /// (`tessera_trust::ledger::split_pro_rata`): on random balances and amounts, the
        /// contract's payouts are the ledger's, holder for holder.
        #[test]
        fn the_contracts_split_is_the_ledgers(
            amount in 0u64..u64::MAX,
            balances in proptest::collection::btree_map("[a-z0-9]{2,8}", 0u64..u64::MAX / 64, 0..10),
        ) {
            let ledger = tessera_trust::ledger::split_pro_rata(amount, &balances);
            // ".near" sorts below every character of the names, so the order is the same.
            let accounts: Vec<(AccountId, u128)> =
                balances.iter().map(|(h, &b)| (acct(&format!("{h}.near")), u128::from(b))).collect();
            let contract: Vec<(String, u64)> = split_pro_rata(u128::from(amount), &accounts)
                .into_iter()
                .map(|(a, p)| (a.as_str().trim_end_matches(".near").to_owned(), p as u64))
                .collect();
            proptest::prop_assert_eq!(contract, ledger);
        }
    }
}
